"""The numeric guard's pieces: the error that stops a run after too many non-finite steps in a row, and the test
hook that makes chosen batches non-finite (the guard itself is in Trainer.train_step: skip, log, count)."""

from __future__ import annotations

import os

NAN_ENV = "SCALELM_TEST_NAN_BATCHES"
"""Test hook: comma-separated 1-based batch numbers (the loader's count of batches drawn, which equals the step
number until a step is skipped) whose gradients and loss are replaced by NaN after the backward pass."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm; the last checkpoint is intact."""


def injected_batches() -> frozenset[int]:
    """The batch numbers NAN_ENV names (empty when unset)."""
    text = os.environ.get(NAN_ENV, "")
    try:
        return frozenset(int(b) for b in text.replace(" ", "").split(",") if b)
    except ValueError:
        raise NonFiniteError(f"{NAN_ENV}={text!r} is not a comma-separated list of batch numbers") from None
