"""`scalelm export hf`: a run or checkpoint → a Hugging Face directory that `AutoModelForCausalLM` and
`AutoTokenizer` load (config.json, model.safetensors, tokenizer files) in the GPT-2 or Llama layout.

A LoRA run exports its base model with the adapters beside it in the peft format (HF_DIR/adapter). The directory
is written under a temporary name and renamed into place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from scalelm.data import load_tokenizer
from scalelm.interop.hf_tokenizer import save_hf_tokenizer
from scalelm.model.config import ModelConfig
from scalelm.model.hf_layout import hf_config, hf_family, to_hf_state
from scalelm.train.adapters import adapter_info
from scalelm.train.checkpoint import load_model, resolve_checkpoint, unique_state
from scalelm.train.init_from import is_hf_dir, load_source
from scalelm.usage import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAPTER_DIR = "adapter"


def checkpoint_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights of a scalelm checkpoint as saved (dtype kept; tied head once), DCP checkpoints gathered."""
    file = checkpoint / "model.safetensors"
    return load_file(str(file)) if file.is_file() else unique_state(load_model(checkpoint))


def fresh_dir(out: str | Path) -> tuple[Path, Path]:
    """(final, temporary) paths for a new output directory; refuses one that exists and is not empty."""
    final = Path(out)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise UsageError(f"--out {final} exists and is not empty; choose a new directory (nothing was written)")
    tmp = final.with_name(f".tmp_{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return final, tmp


def publish(tmp: Path, final: Path) -> None:
    if final.exists():
        final.rmdir()  # empty (checked by fresh_dir)
    tmp.rename(final)


def write_hf_model(directory: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: str | None) -> None:
    """config.json + model.safetensors of `state` (scalelm names) in the HF layout of `cfg`'s family."""
    from transformers import AutoConfig

    kwargs = hf_config(cfg)
    tensors = to_hf_state(state, cfg)
    if dtype is not None:
        tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
    floats = {v.dtype for v in tensors.values() if v.is_floating_point()}
    stored = next(iter(floats)) if len(floats) == 1 else torch.float32
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    # The stored dtype: `dtype` since transformers 4.56 (5 warns on the old name), `torch_dtype` before.
    setattr(config, "dtype" if "dtype" in config.to_dict() else "torch_dtype", stored)
    if cfg.pos == "rope":
        config.rope_theta = cfg.rope_theta  # transformers < 5 reads this key (5 reads rope_parameters)
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def export_hf(source: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Write the model at `source` (run directory or checkpoint) to the new directory `out`; returns it."""
    checkpoint = resolve_checkpoint(source)
    info = adapter_info(checkpoint)
    if info is not None:  # a LoRA run: base weights from its init_from, adapters from the checkpoint
        cfg, state = load_source(info["base"])
    else:
        cfg = ModelConfig.from_dict(json.loads((checkpoint / "model.json").read_text()))
        state = checkpoint_state(checkpoint)
    hf_family(cfg)  # refuse before writing anything
    final, tmp = fresh_dir(out)
    try:
        write_hf_model(tmp, cfg, state, dtype)
        tokenizer = _tokenizer(checkpoint, info)
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, tmp, cfg.max_seq_len)
        if info is not None:
            from scalelm.interop.peft_export import save_peft_adapter

            save_peft_adapter(tmp / ADAPTER_DIR, load_file(str(checkpoint / "model.safetensors")), info, cfg,
                              base_path=final.resolve())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, final)
    return final


def _tokenizer(checkpoint: Path, info: dict | None):
    """The run's saved tokenizer (next to the checkpoint or in its run directory), or a LoRA base's."""
    for candidate in (checkpoint / "tokenizer", checkpoint.parent.parent / "tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            return load_tokenizer(candidate)
    if info is not None and is_hf_dir(info["base"]):
        from scalelm.interop.hf_tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(info["base"])
    return None
