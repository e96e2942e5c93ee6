"""Batches of random contiguous windows, reproducible from (seed, step) alone and sliced by data-parallel rank.

Nothing about a batch depends on how many batches came before it or on how many ranks share it, so the loader's
whole state is one integer (`step`), resume is exact, and a run may resume on a different number of ranks and
still see the same global batches.
"""

from __future__ import annotations

import numpy as np
import torch

from scalelm.data.errors import DataError


def _check_tokens(tokens: np.ndarray, seq_len: int, what: str) -> int:
    """The number of valid window starts; a window needs seq_len + 1 tokens (inputs plus the shifted targets)."""
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} must be at least 1")
    if tokens.ndim != 1:
        raise DataError(f"{what} tokens must be a 1-D array, got shape {tokens.shape}")
    if len(tokens) <= seq_len + 1:
        raise DataError(
            f"the {what} split has {len(tokens)} tokens, not more than seq_len + 1 = {seq_len + 1}; "
            "use a shorter seq_len or prepare more text (or a larger val_fraction for the val split)"
        )
    return len(tokens) - seq_len


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    # One fancy-index gather of [rows, seq_len + 1] (reads only these windows' pages of a memmap, no Python loop
    # per row); astype then copies x and y into contiguous int64 — the index dtype nn.Embedding and
    # cross_entropy want — and from_numpy wraps those copies without a further one.
    w = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)])
    x = torch.from_numpy(w[:, :-1].astype(np.int64))
    y = torch.from_numpy(w[:, 1:].astype(np.int64))
    return x, y


class BatchLoader:
    """Random contiguous windows. The GLOBAL batch of step s is a function of (seed, s) only;
    data-parallel rank r takes rows [r*B/dp, (r+1)*B/dp) — so a run can resume on a different number of ranks
    with the same data stream."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        self.n_starts = _check_tokens(tokens, seq_len, "training")
        if global_batch < 1:
            raise DataError(f"global_batch={global_batch} must be at least 1")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if global_batch % dp_size:
            raise DataError(
                f"dp_size={dp_size} does not divide global_batch={global_batch}; "
                f"use a global_batch that is a multiple of {dp_size}"
            )
        if seed < 0:
            raise DataError(f"seed={seed} must be non-negative")
        self.tokens = tokens
        self.seq_len, self.global_batch, self.seed = int(seq_len), int(global_batch), int(seed)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.local_batch = global_batch // dp_size
        self.step = 0

    def global_starts(self, step: int) -> np.ndarray:
        """[global_batch] int64 window starts of `step`, uniform over the split, from rng([seed, step])."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.n_starts, size=self.global_batch, dtype=np.int64)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y), int64 [global_batch / dp_size, seq_len]; y is x shifted left by one token."""
        lo = self.dp_rank * self.local_batch
        return _windows(self.tokens, self.global_starts(step)[lo : lo + self.local_batch], self.seq_len)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step and seed; dp_rank/dp_size stay this loader's own (they may differ)."""
        for key in ("seq_len", "global_batch"):
            if int(state[key]) != getattr(self, key):
                raise DataError(
                    f"the checkpoint's loader has {key}={state[key]}, this run has {getattr(self, key)}; "
                    f"resume with {key}={state[key]} to continue the same data stream"
                )
        self.step, self.seed = int(state["step"]), int(state["seed"])


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n_batches` batches of windows spread evenly over the split, from its start to its end.

    Fixed by (len(tokens), seq_len, batch, n_batches) alone — no seed — so every run and every evaluation of
    a run measures loss on the same tokens, and numbers are comparable across runs.
    """
    n_starts = _check_tokens(tokens, seq_len, "validation")
    if batch < 1 or n_batches < 1:
        raise DataError(f"batch={batch} and n_batches={n_batches} must both be at least 1")
    starts = np.linspace(0, n_starts - 1, num=batch * n_batches).round().astype(np.int64)
    return [_windows(tokens, rows, seq_len) for rows in starts.reshape(n_batches, batch)]
