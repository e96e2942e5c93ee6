"""Refuse a run whose model cannot fit one rank, before anything is allocated.

The estimate is the perf model's (`scalelm.perf`, what `scalelm plan` reports) for the layout the trainer will
run; the budget is one rank's share of what the machine has: a GPU's memory, or on a CPU the host's memory split
among the processes of this machine. Only a run that cannot fit even an idle machine is refused: the memory
others use right now changes from minute to minute, the machine's size does not.
"""

from __future__ import annotations

import os
from typing import Any

from scalelm.config import Config, ConfigError
from scalelm.perf.frameworks import framework_for
from scalelm.perf.hardware import HardwareError, load_hardware
from scalelm.perf.step import GIB, predict_memory
from scalelm.train.forecast import perf_layout, resolve_hardware


def predicted_mem_gib(cfg: Config, world_size: int, precision: str, device: Any = "cpu") -> float:
    """The perf model's peak memory per rank (GiB) for this run's layout."""
    hw, _ = resolve_hardware(cfg, device)
    if hw is None:
        # The memory model reads the model, layout and framework, never the hardware's speeds: any hardware
        # file serves where this machine has none.
        try:
            hw = load_hardware("h100-sxm-80gb")
        except HardwareError:
            return 0.0
    lo = perf_layout(cfg, world_size, precision)
    microbatches = max(1, cfg.train.global_batch // (lo.dp * lo.micro_batch))
    # The framework profile without forecast.framework's CPU-kernel detail, which imports the kernels (and
    # torch's compiler): this check runs before anything heavy is loaded, and kernels barely move memory.
    fw = framework_for("scalelm torch.compile" if cfg.train.compile else "scalelm")
    return predict_memory(cfg.model, hw, lo, fw, cfg.train.seq_len, microbatches).total / GIB


def rank_budget_gib(device: Any, world_size: int) -> tuple[float, str]:
    """(GiB one rank may use, what that is): the GPU's memory, or the host's split over this machine's ranks."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        total = torch.cuda.get_device_properties(device).total_memory / GIB
        return total, f"{total:.0f} GiB of GPU memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return total / local, f"{total:.0f} GiB of host memory shared by {local} process{'es' if local > 1 else ''}"


def check_fits(cfg: Config, world_size: int, precision: str, device: Any = "cpu") -> None:
    """ConfigError (one line, with the estimate) when the model cannot fit one rank."""
    need = predicted_mem_gib(cfg, world_size, precision, device)
    budget, what = rank_budget_gib(device, world_size)
    if need > budget:
        name = cfg.model.preset or "this model"
        raise ConfigError(f"{name} needs about {need:,.0f} GiB per rank on {world_size} rank(s) (the planner's "
                          f"memory model, {precision}) but a rank has {budget:,.1f} GiB ({what}); use more ranks, "
                          f"a smaller model, or see `scalelm plan`")
