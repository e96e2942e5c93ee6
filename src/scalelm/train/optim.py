"""Optimizers and learning-rate schedules.

The schedule is a pure function of the step (`lr_factor`), so resuming needs only the step count, and the same
function serves every optimizer group (AdamW and Muon groups carry their own `base_lr`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scalelm.config import OptimConfig
from scalelm.train.muon import Muon


def _decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay on matrices only: linear weights and embedding tables; never on norms or biases."""
    return param.dim() >= 2


def build_optimizers(model: nn.Module | list[nn.Module], cfg: OptimConfig, zero1_mesh=None,
                     muon_ns_dtype: str = "bf16") -> list[torch.optim.Optimizer]:
    """AdamW over all parameters, or Muon on the hidden (block) matrices + AdamW on the rest.

    `model` may be a list of model parts (pipeline stages on this rank): one optimizer spans them all. With
    `zero1_mesh` (ZeRO-1) each optimizer is a ZeroRedundancyOptimizer sharding its states over that mesh.
    Returned as a list so the trainer steps, zeroes and checkpoints them uniformly. `muon_ns_dtype`: the
    precision of Muon's orthogonalization (train/muon.py).
    """
    from scalelm.parallel.checkpoint import canonical_name

    parts = model if isinstance(model, list) else [model]
    named = [(canonical_name(n, False), p) for part in parts for n, p in part.named_parameters() if p.requires_grad]
    use_muon = cfg.name == "muon"
    muon_params = [p for n, p in named if use_muon and n.startswith("layers.") and p.dim() == 2]
    muon_ids = {id(p) for p in muon_params}
    rest = [(n, p) for n, p in named if id(p) not in muon_ids]
    decay = [p for n, p in rest if _decays(n, p)]
    no_decay = [p for n, p in rest if not _decays(n, p)]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    groups = [g for g in groups if g["params"]]
    adam_kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    muon_groups = [{"params": muon_params, "base_lr": cfg.muon_lr}]
    if zero1_mesh is not None:
        from scalelm.parallel.data_parallel import zero1_optimizer

        optimizers = [zero1_optimizer(torch.optim.AdamW, groups, zero1_mesh, foreach=True, **adam_kwargs)]
        if muon_params:
            optimizers.append(zero1_optimizer(Muon, muon_groups, zero1_mesh, lr=cfg.muon_lr,
                                              weight_decay=cfg.weight_decay, ns_dtype=muon_ns_dtype))
        return optimizers
    # fused AdamW runs one kernel over all tensors (CPU and CUDA); it needs plain (non-DTensor) params on
    # one device type. Sharded (DTensor) parameters step one at a time: foreach would hold a temporary as large
    # as all of this rank's second moments (their square roots), which at scale is what sharding saved.
    dtensors = any(type(p).__name__ == "DTensor" for _, p in named)
    try:
        if dtensors:
            raise TypeError("DTensor parameters")
        adamw = torch.optim.AdamW(groups, fused=True, **adam_kwargs)
    except (RuntimeError, TypeError):
        adamw = torch.optim.AdamW(groups, foreach=not dtensors, **adam_kwargs)
    optimizers: list[torch.optim.Optimizer] = [adamw]
    if muon_params:
        optimizers.append(Muon(muon_groups, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, ns_dtype=muon_ns_dtype))
    return optimizers


def lr_factor(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then the chosen shape."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps + 1) / span)
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> float:
    """Apply the schedule factor to every group; returns the main (first group's) LR for logging."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
    return optimizers[0].param_groups[0]["lr"]
