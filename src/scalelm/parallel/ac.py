"""Activation checkpointing: keep only block inputs in forward, recompute the block in backward.

full = every block; selective = every `every`-th block (blocks 0, k, 2k, ...), a per-block choice that trades
about (1 − 1/k) of the saved memory for 1/k of the recomputation. Op-level save lists are not implemented.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

log = logging.getLogger("scalelm.parallel")


def apply_ac(model: nn.Module, mode: str, every: int = 2) -> None:
    """Wrap blocks of `model` in place. Parameter names are unchanged in state_dict (the wrapper strips its
    prefix), so checkpoints are the same with and without activation checkpointing."""
    if mode == "none":
        return
    # With dropout the recomputed forward must draw the same masks: preserve (and restore) the RNG state.
    # Without dropout that bookkeeping is wasted, so skip it.
    preserve_rng = model.cfg.dropout > 0
    wrapped = []
    for key, block in model.layers.items():
        if mode == "full" or int(key) % every == 0:
            model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=preserve_rng)
            wrapped.append(key)
    log.info("applied %s activation checkpointing to blocks %s", mode, ", ".join(wrapped) or "(none)")
