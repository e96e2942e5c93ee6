"""Materialize a model built on the meta device: storage on the run's device, then the initial weights, shard
by shard, equal to what one process initializes from the same seed.

A model is built on `torch.device("meta")` (shapes, no storage), split and sharded there (PP split, TP, AC,
compile, FSDP: `parallelize`), and only then given memory: `to_empty` allocates this rank's shards, and each
parameter is drawn whole on the CPU from its own generator (`model.gpt.initial_value`), one at a time, and this
rank's shard of it copied in. No rank ever holds more than its shards plus one full parameter.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from scalelm.model.gpt import initial_value
from scalelm.parallel.checkpoint import canonical_name

log = logging.getLogger("scalelm.parallel")


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def materialize(parts: list[nn.Module], device: torch.device, seed: int) -> None:
    """Give every meta parameter and buffer of `parts` (a GPT, or this rank's pipeline stages, possibly wrapped by
    TP and FSDP) storage on `device` and its initial value for `seed`, in place."""
    for part in parts:
        gpt = part.module if isinstance(part, nn.parallel.DistributedDataParallel) else part
        cfg = gpt.cfg
        tied = cfg.tie_embeddings and gpt.tok_embeddings is not None and gpt.output is not None
        # to_empty gives each tensor its own storage, so a head tied to the embedding becomes a separate
        # parameter: tie it again (TP and FSDP keep the two names on one parameter object until then).
        shared = tied and gpt.output.weight is gpt.tok_embeddings.weight
        part.to_empty(device=device)
        if shared and gpt.output.weight is not gpt.tok_embeddings.weight:
            gpt.output.weight = gpt.tok_embeddings.weight
        gpt.init_buffers(device)
        for name, p in part.named_parameters():
            full = initial_value(cfg, canonical_name(name, cfg.tie_embeddings), p.shape, seed)  # a DTensor's shape is the global one
            if isinstance(p, DTensor):
                # src_data_rank=None: every rank already holds the full value; each keeps its own slice, no
                # communication.
                local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(local)
            else:
                p.copy_(full)
    log.info("materialized the model on %s from seed %d, one parameter at a time", device, seed)

