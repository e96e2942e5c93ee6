"""Fit a run into a wall-clock budget (`train.time_budget_min`): how many optimizer steps the time allows.

The same config trains at very different speeds on different machines (docs/benchmarks.md#make-demo), so a fixed
step count cannot promise a finishing time. With a budget, the trainer times its first PROBE_STEPS steps and sets
the run's length: the most steps (never more than `train.steps`) whose remaining training, evaluations and final
save fit in what is left. It re-plans at every log step from the mean step time so far, since a shared machine's
speed drifts. The first count is decided before the warm-up ends where it can be, so the learning-rate schedule
follows the steps actually run; the count is saved with the checkpoints, and a resumed run keeps it.
"""

from __future__ import annotations

PROBE_STEPS = 12
"""Steps timed before the length is decided: the first two (compilation, allocator warm-up) are left out."""
FORWARD_SHARE = 1 / 3
"""Seconds of a forward-only token over a training token: a forward is a third of a training step's FLOPs, and
an evaluation batch is never larger than a training batch nor runs autograd or the optimizer."""
MARGIN = 0.03
"""Share of the budget held back for what the estimate misses (the final checkpoint, a slower minute)."""


def evaluations_in(done: int, total: int, eval_every: int) -> int:
    """Evaluations still to come when `done` of `total` steps are done: every `eval_every` steps, and at the end."""
    periodic = max(0, (total - 1) // eval_every - done // eval_every) if eval_every else 0
    return periodic + 1


def eval_seconds(step_s: float, tokens_per_step: int, eval_tokens: int, sample_tokens: int, seq_len: int) -> float:
    """Estimated seconds of one evaluation: the validation batches' forward passes, plus the sample. The sample is
    charged as if it re-ran its growing context for each new token: more FLOPs than its cached one-position
    forwards compute, which stands for their running far below a batch's rate."""
    sample_forward_tokens = sum(min(seq_len, 1 + i) for i in range(sample_tokens))
    return FORWARD_SHARE * (eval_tokens + sample_forward_tokens) * step_s / tokens_per_step


def steps_within(budget_s: float, elapsed_s: float, done: int, step_s: float, eval_s: float, eval_every: int,
                 max_steps: int) -> int:
    """The largest total step count n (done <= n <= max_steps) for which the time already spent, the n - done
    remaining steps and the evaluations they bring fit in the budget less its margin; `done` (stop now) when
    none does."""
    left = budget_s * (1 - MARGIN) - elapsed_s

    def fits(total: int) -> bool:
        return (total - done) * step_s + evaluations_in(done, total, eval_every) * eval_s <= left

    # The time needed grows with the step count: bisect (re-planned at every log step, even for long runs).
    lo, hi = done, max_steps  # lo: known to fit (or nothing more does)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
