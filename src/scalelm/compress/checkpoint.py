"""Compressed checkpoints on disk: a checkpoint directory that `scalelm.load`, `scalelm generate` and
`scalelm eval` read like any other.

A quantized checkpoint holds model.json (the model config), model.safetensors (the integer weights, their scales
and zeros, and the float tensors left as they were), quantization.json (which module got which form) and, copied
from the source run, config.toml and tokenizer/. Nothing is pickled: the quantized modules are rebuilt from plain
tensors (compress/quantize.py). Directories are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scalelm.model.config import ModelConfig
from scalelm.train.checkpoint import CheckpointError, resolve_checkpoint

QUANTIZATION_FILE = "quantization.json"


def is_quantized(path: str | Path) -> bool:
    """Whether the checkpoint a run directory or checkpoint directory resolves to is a quantized one."""
    return (resolve_checkpoint(path) / QUANTIZATION_FILE).is_file()


def source_files(checkpoint: Path) -> list[Path]:
    """config.toml and tokenizer/ of the run a checkpoint belongs to (next to it, or in its run directory)."""
    found = []
    for name in ("config.toml", "tokenizer"):
        for candidate in (checkpoint / name, checkpoint.parent.parent / name):
            if candidate.exists():
                found.append(candidate)
                break
    return found


def check_new_out(out: str | Path) -> Path:
    """--out must not hold anything yet: a compressed model never overwrites earlier results."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out {out} already exists and is not empty; choose a new directory")
    return out


def write_directory(out: str | Path, fill: Callable[[Path], None]) -> Path:
    """Call `fill(tmp)` on a temporary directory beside `out`, then rename it to `out` (an interrupted write
    leaves no half-written `out`)."""
    out = check_new_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp_{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    return out


def copy_source_files(source: Path, target: Path) -> None:
    for path in source_files(source):
        if path.is_dir():
            shutil.copytree(path, target / path.name)
        else:
            shutil.copy2(path, target / path.name)


def save_quantized(out: str | Path, tensors: dict[str, torch.Tensor], spec: dict[str, Any], model_cfg: ModelConfig,
                   source: Path) -> Path:
    """Write a quantized checkpoint directory `out` (new) from quantize_tensors' output."""
    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        (tmp / "model.json").write_text(json.dumps(model_cfg.to_dict(), indent=1))
        (tmp / QUANTIZATION_FILE).write_text(json.dumps(dict(spec, source=str(source)), indent=1))
        copy_source_files(source, tmp)

    return write_directory(out, fill)


def load_quantized(path: str | Path, device: str = "cpu") -> nn.Module:
    """The quantized model of a checkpoint directory written by `save_quantized`, in eval mode on `device`."""
    from scalelm.compress.quantize import QuantizeError, swap_quantized
    from scalelm.model.gpt import GPT

    ckpt = resolve_checkpoint(path)
    try:
        cfg = ModelConfig.from_dict(json.loads((ckpt / "model.json").read_text()))
        spec = json.loads((ckpt / QUANTIZATION_FILE).read_text())
        tensors = load_file(str(ckpt / "model.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"quantized checkpoint {ckpt} is unreadable ({e})") from None
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_buffers(device)
    try:
        return swap_quantized(model, tensors, spec, device)
    except (QuantizeError, KeyError) as e:
        raise CheckpointError(f"quantized checkpoint {ckpt} does not fit its model.json ({e})") from None
