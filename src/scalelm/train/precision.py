"""Which precision a run computes in: fp32, bf16 autocast, or fp16 autocast with a GradScaler (CUDA only).

`train.dtype = auto` takes bf16 on CUDA devices that support it (else fp16), and on a CPU bf16 only where this
machine's measured bf16 matmul rate beats its fp32 one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from scalelm.train.peak import cpu_peak_flops


@dataclass
class Precision:
    """How the forward runs: autocast dtype (None = fp32) and whether a GradScaler guards fp16 gradients."""

    name: str
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def cpu_bf16_is_faster() -> bool:
    """Whether bf16 autocast pays on this CPU. Having AVX512-BF16 is not enough: some CPUs with the flag run
    bf16 matmuls faster than fp32 ones and some slower (docs/benchmarks.md#machines), so the measured
    square-matmul rates (cached with the MFU peak) decide."""
    return _has_cpu_bf16() and cpu_peak_flops("bf16") > cpu_peak_flops("fp32")


def _has_cpu_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(requested: str, device: torch.device) -> Precision:
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "bf16" if cpu_bf16_is_faster() else "fp32"
    if requested == "fp32":
        return Precision("fp32", None)
    if requested == "bf16":
        return Precision("bf16", torch.bfloat16)
    if device.type != "cuda":
        raise ValueError("train.dtype=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return Precision("fp16", torch.float16, torch.amp.GradScaler("cuda"))
