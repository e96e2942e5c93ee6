"""Start a run from existing weights (`--init-from`): a scalelm run directory or checkpoint, a directory written by
`scalelm import hf`, or a Hugging Face GPT-2/Llama directory (config.json + safetensors).

Only the weights are taken: the optimizer, schedule, step and data order start fresh. The built model must have
the source's shapes; `source_model_config` gives them, so the CLI builds the model the source describes unless
model keys are set explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from scalelm.config import Config, ConfigError
from scalelm.data import default_dataset, load_tokenizer, open_split
from scalelm.model.config import ModelConfig
from scalelm.model.hf_layout import FormatError, from_hf_state, model_config_from_hf
from scalelm.train.checkpoint import CheckpointError, load_model, resolve_checkpoint, unique_state


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory: config.json with a model_type, and no scalelm model.json."""
    p = Path(path)
    if not (p / "config.json").is_file() or (p / "model.json").is_file():
        return False
    try:
        return "model_type" in json.loads((p / "config.json").read_text())
    except ValueError:
        return False


def hf_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: model.safetensors, or the shards its index names."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(str(path / shard)))
        return tensors
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    raise FormatError(f"{path} has no model.safetensors; scalelm reads safetensors checkpoints (save the model "
                      f"with save_pretrained(..., safe_serialization=True))")


def source_model_config(path: str | Path) -> ModelConfig:
    """The model shape stored at `path` (any source `load_source` reads)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--init-from {str(p)!r} does not exist; pass a run directory, a checkpoint or a "
                              f"Hugging Face model directory")
    if is_hf_dir(p):
        return model_config_from_hf(json.loads((p / "config.json").read_text()))
    return ModelConfig.from_dict(json.loads((resolve_checkpoint(p) / "model.json").read_text()))


def with_source_model(file_values: dict, overrides: dict) -> dict:
    """With init_from set and no model.preset, the model starts as the source's: its model keys go under the file
    values and flags, so `--init-from RUN` alone builds the shape the weights need (build_config's inputs)."""
    init_from = overrides.get("init_from", file_values.get("init_from"))
    if not init_from or "model.preset" in overrides or "model.preset" in file_values:
        return file_values
    model = source_model_config(init_from).to_dict()
    source = {f"model.{k}": v for k, v in model.items()}
    return {**source, **file_values}


def load_source(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, full state dict with scalelm names) of a run, checkpoint or HF directory."""
    cfg = source_model_config(path)
    if is_hf_dir(path):
        return cfg, from_hf_state(hf_safetensors(Path(path)), cfg)
    return cfg, unique_state(load_model(path))


def load_init_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the weights at `path` into the built plain `model` (same names and shapes, tied head re-tied);
    one line naming the first tensor whose shape differs."""
    _, state = load_source(path)
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:
            raise CheckpointError(f"--init-from {path}: its tensor {name} has no place in the configured model; "
                                  f"leave the --model.* keys unset so the model follows the source")
        if own[name].shape != tensor.shape:
            raise CheckpointError(f"--init-from {path}: {name} is {list(tensor.shape)} there but "
                                  f"{list(own[name].shape)} in the configured model; leave the --model.* keys unset "
                                  f"so the model follows the source")
    tied = {"output.weight"} if getattr(model.cfg, "tie_embeddings", False) else set()
    missing = [n for n in own if n not in state and n not in tied]
    if missing:
        raise CheckpointError(f"--init-from {path} has no {missing[0]} (the configured model has tie_embeddings="
                              f"{model.cfg.tie_embeddings}); leave the --model.* keys unset so the model follows "
                              f"the source")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def source_ids(path: str | Path, text: str) -> list[int] | None:
    """`text` encoded by the tokenizer saved with the source at `path` (None where it has none)."""
    p = Path(path)
    if is_hf_dir(p):
        if not (p / "tokenizer.json").is_file():
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(p / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    checkpoint = resolve_checkpoint(p)
    for candidate in (checkpoint / "tokenizer", checkpoint.parent.parent / "tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            return load_tokenizer(candidate).encode(text)
    return None


def check_same_tokenizer(path: str | Path, data_dir: Path) -> None:
    """Refuse a dataset whose tokenizer gives other ids than the source model's on the dataset's own text: the
    weights would read every token as another one."""
    tokenizer = load_tokenizer(data_dir)
    val = open_split(data_dir, "val")
    text = tokenizer.decode(val[:2000].tolist())
    expected = tokenizer.encode(text)
    try:
        ids = source_ids(path, text)
    except ValueError:  # a character the source's vocabulary lacks
        ids = []
    if ids is not None and ids != expected:
        raise ConfigError(f"--init-from {path} encodes text with another tokenizer than the dataset {data_dir}; "
                          f"train on data prepared with the model's tokenizer")


def prepare_finetune(model: nn.Module, cfg: Config) -> None:
    """The fine-tuning steps a run's config asks for, on the built plain model: weights from cfg.init_from
    (checked against the dataset's tokenizer), then LoRA adapters (cfg.lora) with the base frozen."""
    if cfg.init_from:
        check_same_tokenizer(cfg.init_from, Path(cfg.data.path) if cfg.data.path else default_dataset())
        load_init_weights(model, cfg.init_from)
    if cfg.lora.rank:
        if not cfg.init_from:
            raise ConfigError("lora.rank needs --init-from: LoRA adapts the weights of an existing model")
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ConfigError("LoRA runs train in one process; drop --nproc (the adapters are small)")
        from scalelm.train.adapters import write_adapter_info
        from scalelm.train.lora import apply_lora

        modules = apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
        write_adapter_info(cfg, modules)
