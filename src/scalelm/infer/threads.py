"""The intra-op thread count of decode steps, chosen by timing them.

A large model's decode step streams its weights, and on a quiet machine every core adds memory bandwidth; but a
step split over all threads waits at each parallel region for the slowest one, so where other processes hold the
cores (a server next to a training job) a descheduled thread stalls every layer and one thread is faster. Which
holds changes with the machine's load, so `ThreadChoice` times the steps as they run: it decodes with the faster
count it has measured and, every `probe_every` steps, times the other once. A step's numbers do not depend on the
thread count (the decode kernel sums each output in a fixed order), so switching changes the speed, not the text.
"""

from __future__ import annotations


class ThreadChoice:
    """Picks, step after step, the faster of `candidates` intra-op thread counts (0: PyTorch's setting) for steps
    of one kind (`key`: the batch size, as steps of different batches take different times)."""

    def __init__(self, candidates: tuple[int, ...] = (0, 1), probe_every: int = 32, smoothing: float = 0.5):
        self.candidates, self.probe_every, self.smoothing = candidates, probe_every, smoothing
        self.seconds: dict[tuple[int, int], float] = {}  # (key, threads) → smoothed seconds per step
        self.steps: dict[int, int] = {}

    def pick(self, key: int = 1) -> int:
        """The thread count for the next step of kind `key`: each candidate once, then the fastest, and every
        probe_every-th step the next one after it (so a change of load is noticed)."""
        step = self.steps[key] = self.steps.get(key, 0) + 1
        for threads in self.candidates:
            if (key, threads) not in self.seconds:
                return threads
        best = min(self.candidates, key=lambda threads: self.seconds[key, threads])
        if step % self.probe_every == 0:
            return self.candidates[(self.candidates.index(best) + 1) % len(self.candidates)]
        return best

    def record(self, threads: int, seconds: float, key: int = 1) -> None:
        """A step of kind `key` with `threads` took `seconds`."""
        before = self.seconds.get((key, threads))
        self.seconds[key, threads] = seconds if before is None else (
            self.smoothing * before + (1 - self.smoothing) * seconds)
