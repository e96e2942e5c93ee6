"""Faster CPU training for the plain model, applied from outside: `apply_cpu_kernels(model, matmul=...)`.

Each speedup is a module swap (torchao's habit: a function takes the built model and changes modules in place),
so parameters, their names and the state dict stay those of the plain model, and checkpoints move freely between
a run with kernels and one without:

- `Attention` → `KernelAttention`: q/k/v as one matmul, scalelm's causal attention kernel with RoPE inside (C++);
- `nn.RMSNorm` → `KernelRMSNorm`: the weight gradient as its own streaming pass (C++);
- `nn.Embedding` → `ATenBackwardEmbedding`: ATen's embedding backward instead of Inductor's atomic adds;
- `nn.Linear` → `OneDNNLinear` (with matmul="onednn"): fp32 GEMMs by oneDNN instead of the BLAS.

Every swapped module checks its operands on each call and takes its parent's forward for anything but what its
kernel handles (bf16 autocast, dropout, DTensors), so a swapped model computes the same function everywhere.
The C++ library is built on first use; where it cannot be (no compiler, no ninja) one line is logged and the
swaps that need it are left out. docs/benchmarks.md#training-throughput-and-cpu-kernels has the gain.
"""

from __future__ import annotations

import logging

from torch import nn

from scalelm.kernels.cpu import build
from scalelm.kernels.cpu.attention import KernelAttention
from scalelm.kernels.cpu.embedding import ATenBackwardEmbedding
from scalelm.kernels.cpu.linear import OneDNNLinear, onednn_available
from scalelm.kernels.cpu.norm import KernelRMSNorm
from scalelm.model.gpt import Attention

log = logging.getLogger("scalelm.kernels")


def apply_cpu_kernels(model: nn.Module, matmul: str = "blas", kernels: bool = True) -> list[str]:
    """Swap `model`'s modules (a GPT, or a pipeline stage of one) for scalelm's CPU versions, in place.

    kernels: the C++ attention and RMSNorm kernels, q/k/v fusion and ATen's embedding backward; matmul: "onednn"
    routes fp32 linear layers through oneDNN, "blas" leaves them to PyTorch. Applies nothing to a model with
    parameters off the CPU or sharded as DTensors (tensor parallelism); a model on the meta device (built there to
    be sharded, then materialized on the CPU) is swapped like a CPU one. Returns what it applied, for the log."""
    if matmul not in ("blas", "onednn"):
        raise ValueError(f"matmul must be 'blas' or 'onednn', got {matmul!r}")
    if matmul == "onednn" and not onednn_available():
        raise ValueError("this PyTorch build has no oneDNN (mkldnn); use matmul='blas'")
    if any(type(p) is not nn.Parameter or p.device.type not in ("cpu", "meta") for p in model.parameters()):
        log.info("CPU kernels not applied: parameters are not plain CPU tensors")
        return []
    built = kernels and build.available()
    swaps: dict[type, type] = {}
    if kernels:
        swaps.update({Attention: KernelAttention, nn.Embedding: ATenBackwardEmbedding})
    if built:
        swaps[nn.RMSNorm] = KernelRMSNorm
    if matmul == "onednn":
        swaps[nn.Linear] = OneDNNLinear
    applied: dict[str, int] = {}
    for module in model.modules():
        new_class = swaps.get(type(module))
        if new_class is None:
            continue
        module.__class__ = new_class  # the same object, parameters and hooks: only the forward changes
        if new_class is KernelAttention:
            module.onednn = matmul == "onednn"
        applied[new_class.__name__] = applied.get(new_class.__name__, 0) + 1
    summary = [f"{name} ×{count}" for name, count in applied.items()]
    if kernels and not built:
        summary.append("no C++ kernels (not built)")
    log.info("applied CPU kernels: %s", ", ".join(summary) or "none")
    return summary

__all__ = ["apply_cpu_kernels"]
