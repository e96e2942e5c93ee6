"""What FSDP2 and tensor parallelism cost on this machine beyond the bytes of their collectives.

`scalelm calibrate` runs this inside its two gloo worker processes. A small stack of MLP units (generic sizes,
not any preset) runs forward and backward three ways per rank: plain, sharded with `fully_shard` per unit, and
split with `ColwiseParallel`/`RowwiseParallel` per unit. The caller subtracts the plain compute and the transfer
time its alpha-beta fit predicts for the collectives each variant issues; what is left, per unit, is the host
work the step model cannot derive from bytes: FSDP's copy-in/copy-out and hooks, DTensor dispatch, and the wait
for the slower rank at every synchronization point.
"""

from __future__ import annotations

import time

D_MODEL, HIDDEN, TOKENS, UNITS = 256, 1024, 2048, 4


def _units(hidden: int):
    from torch import nn

    return nn.Sequential(*[nn.Sequential(nn.Linear(D_MODEL, hidden, bias=False), nn.ReLU(),
                                         nn.Linear(hidden, D_MODEL, bias=False)) for _ in range(UNITS)])


def measure_parallel_overheads(world: int, reps: int = 11) -> dict:
    """Seconds per forward+backward of the unit stack: plain full-size (`plain`), FSDP (`fsdp`), plain with
    the hidden size split over the ranks (`tp_local`) and tensor-parallel (`tp`), plus the message sizes."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    x = torch.randn(TOKENS, D_MODEL)
    mesh = init_device_mesh("cpu", (world,))

    def step_of(model):
        def step():
            model(x).sum().backward()
            model.zero_grad(set_to_none=True)

        return step

    sharded, split = _units(HIDDEN), _units(HIDDEN)
    for unit in sharded:
        fully_shard(unit, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    for unit in split:
        parallelize_module(unit, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    variants = {"plain": _units(HIDDEN), "fsdp": sharded, "tp_local": _units(HIDDEN // world), "tp": split}
    steps = {name: step_of(model) for name, model in variants.items()}
    for step in steps.values():
        step()
    # Alternate the variants rep by rep, so a drift of the machine's speed hits all of them alike.
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    plain, fsdp, tp_local, tp = (sorted(t)[len(t) // 2] for t in times.values())
    return {"plain": plain, "fsdp": fsdp, "tp_local": tp_local, "tp": tp, "units": UNITS,
            "unit_param_bytes": 2 * D_MODEL * HIDDEN * 4, "activation_bytes": TOKENS * D_MODEL * 4}


def per_unit_overheads(m: dict, ag_s, ar_s) -> tuple[float, float]:
    """(FSDP µs per unit and step, TP µs per column/row pair and step) beyond compute and transfer, given
    functions giving all-gather and all-reduce seconds for a message size (the caller's alpha-beta fit).
    Per unit FSDP gathers the parameters twice (forward, and again in backward) and reduce-scatters the
    gradients (as much traffic as a gather); TP all-reduces the activations once in forward and once in backward."""
    fsdp_transfer = 3 * ag_s(m["unit_param_bytes"])
    fsdp = (m["fsdp"] - m["plain"]) / m["units"] - fsdp_transfer
    tp = (m["tp"] - m["tp_local"]) / m["units"] - 2 * ar_s(m["activation_bytes"])
    return max(0.0, fsdp) * 1e6, max(0.0, tp) * 1e6
