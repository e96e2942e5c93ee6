"""A trained model and its tokenizer, from a run directory or a checkpoint directory, ready for inference."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from scalelm.data import load_tokenizer
from scalelm.infer.generate import GenerationError
from scalelm.train.checkpoint import load_model, resolve_checkpoint


def tokenizer_dir(checkpoint: Path) -> Path:
    """The tokenizer a run saved: next to the checkpoint, or in its run directory (RUN/checkpoints/step_N)."""
    for candidate in (checkpoint / "tokenizer", checkpoint.parent.parent / "tokenizer"):
        if candidate.is_dir():
            return candidate
    raise GenerationError(f"no tokenizer/ directory next to {checkpoint} or in its run directory; "
                          "was it written by `scalelm train`?")


def load_any_model(path: str | Path, device: str = "cpu") -> nn.Module:
    """The model of a run directory or checkpoint in eval mode on `device`: a trained one, or a quantized one
    written by `scalelm quantize` (rebuilt with its quantized modules)."""
    from scalelm.compress.checkpoint import is_quantized, load_quantized

    if is_quantized(path):
        return load_quantized(path, device=device)
    return load_model(path, device=device)


def load_for_inference(path: str | Path, device: str = "cpu") -> tuple[nn.Module, object]:
    """(model in eval mode on `device`, tokenizer) of a run directory (its newest checkpoint) or a checkpoint."""
    checkpoint = resolve_checkpoint(path)
    tokenizer = load_tokenizer(tokenizer_dir(checkpoint))
    return load_any_model(checkpoint, device=device), tokenizer
