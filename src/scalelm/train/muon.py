"""Muon whose Newton-Schulz orthogonalization runs in a chosen precision.

`torch.optim.Muon` always orthogonalizes in bf16: right on GPUs and on CPUs with fast bf16 matmuls, but some CPUs
run bf16 GEMMs at about half their fp32 rate, and there fp32 makes the orthogonalization, a sizeable share of a
step, shorter (the trainer picks by measured rates, train/run.py). This class is torch's algorithm and state (a
`momentum_buffer` per matrix, the same hyper-parameters and learning-rate adjustment), so checkpoints move between
the two; only the orthogonalization's dtype is a parameter. Written out rather than patched because torch's step
calls its module-level bf16 function directly.

Under FSDP, HSDP and tensor parallelism a rank holds shards of a matrix; the Newton-Schulz iteration needs the
whole matrix, so each update is gathered per parameter, orthogonalized and re-sharded (`orthogonalize_whole`),
as distributed Muon implementations do: the same optimizer, and the same updates, on every layout.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def orthogonalize(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch.optim.Muon (Jordan et al. 2024), in `dtype`."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def orthogonalize_whole(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                        dtype: torch.dtype) -> torch.Tensor:
    """`orthogonalize` of the whole matrix also when `update` is a DTensor shard (FSDP, HSDP, TP): the matrix is
    all-gathered, orthogonalized (identically on every rank) and each rank keeps its own shard of the result, so
    every layout applies the single-process update. One matrix is whole at a time."""
    if not isinstance(update, DTensor):
        return orthogonalize(update, coefficients, steps, eps, dtype)
    full = orthogonalize(update.full_tensor(), coefficients, steps, eps, dtype)
    # src_data_rank=None: every rank holds the same result; each keeps its slice, no communication.
    return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-matrix learning rate: `original` scales by sqrt(max(1, rows/cols))."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Muon(torch.optim.Muon):
    """`ns_dtype`: "bf16" (torch's choice) or "fp32"; a name, not a torch.dtype, so that wrappers which copy
    constructor arguments into param groups (ZeroRedundancyOptimizer) keep checkpoints plain."""

    def __init__(self, params, ns_dtype: str = "bf16", **kwargs):
        if ns_dtype not in DTYPES:
            raise ValueError(f"ns_dtype={ns_dtype!r}; use one of {sorted(DTYPES)}")
        super().__init__(params, **kwargs)
        self.ns_dtype = DTYPES[ns_dtype]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize_whole(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                             self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
