"""What FSDP2 and tensor parallelism cost on this machine beyond the bytes of their collectives.

`scalelm calibrate` runs this inside its two gloo worker processes. Stacks of MLP units (generic sizes, not any
preset) run forward and backward per rank: plain, sharded with `fully_shard` per unit, and split with
`ColwiseParallel`/`RowwiseParallel` per unit next to a plain stack of the split size. The caller subtracts the
compute and the transfer time its alpha-beta fit predicts for the collectives each variant issues:

- FSDP: what is left per unit is host work the step model cannot derive from bytes (copy-in/copy-out, hooks,
  the wait for the slower rank), a fixed cost per unit (`fsdp_unit_us`).
- TP: what is left grows with the message, not per call. Inside a training step the activation all-reduces take
  several times what the same all-reduce takes between idle processes: gloo's worker thread shares the core with
  the compute thread, and the ranks reach each all-reduce at different times (docs/benchmarks.md#calibration).
  So the TP stack runs at the message size of a real CPU step (8 MiB) and the result is a factor on the
  all-reduce time (`tp_comm_slowdown`).
"""

from __future__ import annotations

from statistics import median

from scalelm.calibrate.timing import interleaved_s

D_MODEL, HIDDEN, TOKENS, UNITS = 256, 1024, 2048, 4
TP_HIDDEN, TP_TOKENS = 512, 8192
"""The TP stack: 8,192 tokens × 256 fp32 = 8 MiB all-reduces, as in a shakespeare-char step at batch 32."""


def _units(hidden: int):
    from torch import nn

    return nn.Sequential(*[nn.Sequential(nn.Linear(D_MODEL, hidden, bias=False), nn.ReLU(),
                                         nn.Linear(hidden, D_MODEL, bias=False)) for _ in range(UNITS)])


def measure_parallel_overheads(world: int, rounds: int = 7) -> dict:
    """Extra seconds per forward+backward of FSDP over the plain stack (`fsdp_extra`, at TOKENS) and of TP over a
    plain stack with the hidden size split over the ranks (`tp_extra`, at TP_TOKENS), and the message sizes.
    Every rank runs the same fixed number of steps (3·rounds per variant, calibrate.timing.interleaved_s)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world,))

    def step_of(model, tokens: int):
        x = torch.randn(tokens, D_MODEL)

        def step():
            model(x).sum().backward()
            model.zero_grad(set_to_none=True)

        return step

    sharded, split = _units(HIDDEN), _units(TP_HIDDEN)
    for unit in sharded:
        fully_shard(unit, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    for unit in split:
        parallelize_module(unit, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    steps = {"plain": step_of(_units(HIDDEN), TOKENS), "fsdp": step_of(sharded, TOKENS),
             "tp_local": step_of(_units(TP_HIDDEN // world), TP_TOKENS), "tp": step_of(split, TP_TOKENS)}
    # The variants in rounds, so a drift of the machine's speed hits all of them alike.
    times = dict(zip(steps, interleaved_s(list(steps.values()), rounds)))

    def extra(variant: str, base: str) -> float:
        """Median of the variant's differences to the base stack timed just before it (pairs close in time), not
        the difference of two medians, which a slow minute on one side alone can double."""
        return median(a - b for a, b in zip(times[variant], times[base]))

    return {"fsdp_extra": extra("fsdp", "plain"), "tp_extra": extra("tp", "tp_local"), "units": UNITS,
            "unit_param_bytes": 2 * D_MODEL * HIDDEN * 4, "activation_bytes": TP_TOKENS * D_MODEL * 4}


def per_unit_overheads(m: dict, ag_s, ar_s) -> tuple[float, float]:
    """(FSDP µs per unit and step beyond compute and transfer, TP all-reduce slowdown), given functions giving
    all-gather and all-reduce seconds for a message size (the caller's alpha-beta fit). Per unit FSDP gathers the
    parameters twice (forward, and again in backward) and reduce-scatters the gradients (as much traffic as a
    gather); TP all-reduces the activations once in forward and once in backward, and the slowdown is what those
    two took in the step over what the fit predicts (at least 1)."""
    fsdp_transfer = 3 * ag_s(m["unit_param_bytes"])
    fsdp = m["fsdp_extra"] / m["units"] - fsdp_transfer
    tp_comm = m["tp_extra"] / m["units"]
    return max(0.0, fsdp) * 1e6, max(1.0, tp_comm / (2 * ar_s(m["activation_bytes"])))
