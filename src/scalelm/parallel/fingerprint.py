"""The hash of a sharded model's weights, streamed one parameter at a time: no rank ever holds the whole model.

The digest is byte for byte the single-process one (`train.checkpoint.state_sha256` of the plain model: sorted
single-process names, then per parameter its name, dtype, shape and bytes), so equal weights hash equally on
every layout. Parameters are visited in that sorted order; each is made whole where it lives (a DTensor
all-gathered over its mesh, one parameter at a time) and, when it lives on another pipeline stage, sent to rank 0,
which feeds the hash and drops it.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from scalelm.parallel.checkpoint import named_parameters


@torch.no_grad()
def sharded_sha256(parts: list[nn.Module], tied: bool, pp_group=None, sender: bool = True) -> str | None:
    """sha256 of the full model on global rank 0 (None elsewhere). Every rank calls it. `pp_group`: the
    pipeline group (None without pipeline parallelism); `sender`: this rank sends its stage's parameters to
    rank 0 (one rank per pipeline stage: data- and tensor-parallel coordinate 0)."""
    local: dict[str, torch.Tensor] = {}
    for name, p in named_parameters(parts, tied):
        local.setdefault(name, p)  # a tied copy on the last stage is the embedding: hashed once
    pp_rank = dist.get_rank(pp_group) if pp_group is not None else 0
    # Which pipeline rank holds each name first, with its dtype and shape: tiny, gathered as objects.
    entries = {name: (pp_rank, str(p.dtype), tuple(p.shape)) for name, p in local.items()}
    gathered: list = [None] * (dist.get_world_size(pp_group) if pp_group is not None else 1)
    if pp_group is not None:
        dist.all_gather_object(gathered, entries, group=pp_group)
    else:
        gathered = [entries]
    owner: dict[str, tuple[int, str, tuple[int, ...]]] = {}
    for piece in gathered:
        for name, entry in piece.items():
            if name not in owner or entry[0] < owner[name][0]:
                owner[name] = entry
    lead = dist.get_rank() == 0
    h = hashlib.sha256() if lead else None
    for name in sorted(owner):
        src, dtype, shape = owner[name]
        full = None
        if src == pp_rank:
            p = local[name]
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach()  # collective over p's mesh
            if src != 0 and sender:
                dist.send(full.contiguous(), dst=dist.get_global_rank(pp_group, 0), group=pp_group)
        elif lead and src != 0:
            full = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")),
                               device=next(iter(local.values())).device)
            dist.recv(full, src=dist.get_global_rank(pp_group, src), group=pp_group)
        if lead:
            t = full.detach().to("cpu").contiguous()
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        del full
    return h.hexdigest() if lead else None
