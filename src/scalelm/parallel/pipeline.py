"""Pipeline parallelism: split the blocks into balanced stages and drive them with a torch.distributed.pipelining
schedule. The embedding lives on the first stage, the final norm, head and loss on the last.

Stages are cut from the full model by deleting what a stage does not own; blocks keep their string keys, so a
stage's parameter names are the single-process names and checkpoints reshard across layouts. Stage s of S runs
on pipeline rank s mod pp ("loop" order: GPipe, 1F1B, interleaved schedules), or for ZBV in a V: rank r holds
stages r and S−1−r.

Tied embeddings (head = embedding table) span the first and last stage. As in Megatron-LM, both stages keep a copy;
after backward the two gradients are summed across the two ranks (`sync_tied_grads`), so both copies see the
gradient of the tied weight and stay equal step after step.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

log = logging.getLogger("scalelm.parallel")

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B,
             "interleaved-zb": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble}


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The stages pipeline rank `pp_rank` runs, in order."""
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def split_layers(n_layer: int, n_stages: int) -> list[list[str]]:
    """Contiguous, balanced block keys per stage: sizes differ by at most one, larger stages first."""
    base, extra = divmod(n_layer, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append([str(i) for i in range(start, start + size)])
        start += size
    return out


def stage_module(model: nn.Module, stage: int, n_stages: int, layers: list[str]) -> nn.Module:
    """A copy of `model` holding only stage `stage`: its blocks, plus the embedding (first) or head (last)."""
    part = copy.deepcopy(model)
    for key in list(part.layers.keys()):
        if key not in layers:
            del part.layers[key]
    if stage != 0:
        part.tok_embeddings = None
        part.pos_embeddings = None
    if stage != n_stages - 1:
        part.norm = None
        part.output = None
    return part


def split_model(model: nn.Module, pp_rank: int, pp: int, stages_per_rank: int, schedule: str
                ) -> tuple[list[int], list[nn.Module]]:
    """(stage ids, stage modules) of this pipeline rank."""
    n_stages = pp * stages_per_rank
    per_stage = split_layers(model.cfg.n_layer, n_stages)
    ids = stage_ids(pp_rank, pp, stages_per_rank, schedule)
    parts = [stage_module(model, s, n_stages, per_stage[s]) for s in ids]
    log.info("pipeline rank %d of %d: stages %s with blocks %s (%s schedule)", pp_rank, pp, ids,
             [per_stage[s] for s in ids], schedule)
    return ids, parts


def build_schedule(parts: list[nn.Module], ids: list[int], n_stages: int, pp_mesh: DeviceMesh,
                   device: torch.device, schedule: str, microbatches: int, loss_fn):
    """PipelineStages for this rank's (already parallelized) parts, and the schedule that drives them."""
    group = pp_mesh.get_group()
    stages = [PipelineStage(part, s, n_stages, device, group=group) for part, s in zip(parts, ids)]
    cls = SCHEDULES[schedule]
    # The loss is already a sum over tokens divided by the global token count, so micro-batch gradients add up
    # to the full-batch gradient: the schedule must not divide them by the number of micro-batches again.
    if schedule in ("gpipe", "1f1b"):
        return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


@torch.no_grad()
def forward_only(parts: list[nn.Module], ids: list[int], owners: list[int], pp_group, x: torch.Tensor,
                 hidden_shape: tuple[int, ...]) -> torch.Tensor | None:
    """Run a whole batch through the stages in order, forward only (evaluation): each stage's owner receives
    the hidden states from the previous stage's owner, runs its part and sends the result on. Returns the last
    stage's output on the rank that owns it, else None. Simpler than a schedule, and it works for all of them
    (ZBV's schedule has no forward-only mode)."""
    me = dist.get_rank(pp_group)
    h = x
    for s, owner in enumerate(owners):
        if owner != me:
            continue
        if s > 0 and owners[s - 1] != me:
            h = torch.empty(hidden_shape, dtype=torch.float32, device=x.device)
            dist.recv(h, src=dist.get_global_rank(pp_group, owners[s - 1]), group=pp_group)
        h = parts[ids.index(s)](h)
        if s < len(owners) - 1 and owners[s + 1] != me:
            dist.send(h.float().contiguous(), dst=dist.get_global_rank(pp_group, owners[s + 1]), group=pp_group)
    return h if owners[-1] == me else None


def stage_owners(pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """owners[s] = the pipeline rank that runs stage s."""
    owners = [0] * (pp * stages_per_rank)
    for r in range(pp):
        for s in stage_ids(r, pp, stages_per_rank, schedule):
            owners[s] = r
    return owners


class TiedEmbeddings:
    """Keeps the first stage's embedding table and the last stage's head (a copy of it) equal by summing their
    gradients after backward: locally when one rank holds both (ZBV), else over a two-rank group."""

    def __init__(self, parts: list[nn.Module], mesh: DeviceMesh, pp: int, last_stage_rank: int):
        self.first = next((p.tok_embeddings.weight for p in parts if p.tok_embeddings is not None), None)
        self.last = next((p.output.weight for p in parts if p.output is not None and p.tok_embeddings is None), None)
        self.group = None
        if last_stage_rank != 0:
            grid = mesh.mesh  # [pp, dp_replicate, dp_shard, tp] of global ranks
            me = dist.get_rank()
            for ranks in zip(grid[0].flatten().tolist(), grid[last_stage_rank].flatten().tolist()):
                group = dist.new_group(list(ranks))  # every rank creates every group, in the same order
                if me in ranks:
                    self.group = group

    @torch.no_grad()
    def sync_grads(self) -> None:
        for w in (self.first, self.last):
            # Under TP the embedding's gradient comes back Replicate(), the parameter is Shard(0): take our shard
            # (a local slice) so both ends hold same-shaped tensors.
            if w is not None and w.grad is not None and hasattr(w.grad, "placements") and \
                    w.grad.placements != w.placements:
                w.grad = w.grad.redistribute(w.device_mesh, w.placements)
        grads = [_local(w.grad) for w in (self.first, self.last) if w is not None and w.grad is not None]
        if len(grads) == 2:  # both ends on this rank
            total = grads[0] + grads[1]
            grads[0].copy_(total)
            grads[1].copy_(total)
        elif len(grads) == 1 and self.group is not None:
            dist.all_reduce(grads[0], group=self.group)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
