"""`scalelm merge`: a LoRA run (adapters alone in its checkpoints) → a plain model directory with the adapters
folded into the weights, which every other command reads like any checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scalelm.data import load_tokenizer
from scalelm.interop.hf_export import fresh_dir, publish
from scalelm.model.gpt import GPT
from scalelm.train.adapters import adapter_info
from scalelm.train.checkpoint import CheckpointError, resolve_checkpoint, unique_state
from scalelm.train.init_from import load_source
from scalelm.train.lora import apply_lora, load_adapter_state, merge_lora


def load_lora_model(path: str | Path) -> nn.Module:
    """The base model of a LoRA run (or checkpoint) with its adapters applied (not merged), in eval mode."""
    checkpoint = resolve_checkpoint(path)
    info = adapter_info(checkpoint)
    if info is None:
        raise CheckpointError(f"{path} is not a LoRA run (no adapter.json); its checkpoints already hold the whole "
                              f"model")
    cfg, state = load_source(info["base"])
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_buffers("cpu")
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.load_state_dict(state, strict=False)
    apply_lora(model, info["rank"], info["alpha"], info["targets"])
    try:
        load_adapter_state(model, load_file(str(checkpoint / "model.safetensors")))
    except ValueError as e:
        raise CheckpointError(f"{checkpoint}: {e}; was the run's adapter.json changed?") from None
    return model.eval()


def merge_run(path: str | Path, out: str | Path) -> Path:
    """Fold a LoRA run's adapters into its base and write model.json + model.safetensors + tokenizer/ to `out`."""
    model = merge_lora(load_lora_model(path))
    checkpoint = resolve_checkpoint(path)
    final, tmp = fresh_dir(out)
    try:
        save_file(unique_state(model), str(tmp / "model.safetensors"))
        (tmp / "model.json").write_text(json.dumps(model.cfg.to_dict(), indent=1))
        for candidate in (checkpoint / "tokenizer", checkpoint.parent.parent / "tokenizer"):
            if (candidate / "tokenizer.json").is_file():
                load_tokenizer(candidate).save(tmp / "tokenizer")
                break
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, final)
    return final
