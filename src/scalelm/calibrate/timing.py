"""How `scalelm calibrate` times code: torch.utils.benchmark.Timer with the thread count PyTorch uses here.

Timer runs on one thread unless told otherwise; a calibration must measure with the threads the trainer uses
(OMP_NUM_THREADS; torchrun sets 1 per process), so every timer here takes torch.get_num_threads(). Both ways of
timing keep the median, not the best call: the typical speed is what a training run on a shared machine sees.

* `median_s`: one function alone, `Timer.blocked_autorange` for a time budget.
* `interleaved_s`: several functions in rounds, one timed call each per round, so a change of the machine's speed
  hits all of them alike (docs/benchmarks.md#calibration). The number of calls is fixed, so processes that run
  collectives inside the timed functions stay in step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def make_timer(fn: Callable[[], object]):
    """A torch.utils.benchmark.Timer calling fn() on the threads PyTorch uses now."""
    import torch
    from torch.utils.benchmark import Timer

    return Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def median_s(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds per call of fn over at least `min_run_time` seconds of calls. Timer first grows the calls
    per timed block until its own cost is negligible (those calls warm the code up and are not counted), then
    times blocks; the median is over the blocks' seconds per call."""
    return make_timer(fn).blocked_autorange(min_run_time=min_run_time).median


def interleaved_s(fns: Sequence[Callable[[], object]], rounds: int) -> list[list[float]]:
    """Seconds of single calls: `rounds` rounds calling each of `fns` in turn, result[i] the samples of fns[i].
    Each sample is `Timer.timeit(1)`, which makes two untimed calls before the timed one: a fixed 3·rounds calls
    per function, whatever the timings."""
    timers = [make_timer(fn) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for timer, out in zip(timers, samples):
            out.append(timer.timeit(1).median)
    return samples

