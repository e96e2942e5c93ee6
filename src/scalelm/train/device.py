"""The device a run asks for (`device = auto|cpu|cuda`), checked against what this machine has."""

from __future__ import annotations

import torch

from scalelm.config import ConfigError


def resolve_device(requested: str) -> torch.device:
    """auto = CUDA when a GPU is visible, else CPU; cuda without a GPU is a ConfigError saying what to pass."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use --device cpu (or auto)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
