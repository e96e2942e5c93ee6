"""Apply parallelism to a plain model, in the fixed order: PP split → per stage TP → AC → compile → FSDP, then
materialize a meta-device model's shards, then DDP.

`parallelize` returns a `Parallel` — everything the trainer needs to run a step on this rank: the model parts,
the pipeline schedule (or None), the mesh and the groups for reductions. Each apply_* function logs what it did.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import importlib
import logging
import os
import types
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from scalelm.config import Config
from scalelm.parallel.ac import apply_ac
from scalelm.parallel.data_parallel import apply_ddp, apply_fsdp, fsdp_dtypes
from scalelm.parallel.dims import ParallelDims, coordinates
from scalelm.parallel.materialize import is_meta, materialize
from scalelm.parallel.pipeline import TiedEmbeddings, build_schedule, forward_only, split_model, stage_owners
from scalelm.parallel.tp import apply_tp

log = logging.getLogger("scalelm.parallel")


def init_distributed(device: torch.device, timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR in the environment): NCCL on
    CUDA, gloo on CPU; a collective waits at most `timeout_s` (None: torch's default) for the other ranks.
    Returns (rank, world size); (0, 1) and no process group for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _restart_store(timeout_s)
        if store is None:
            dist.init_process_group(backend, **timeout)
        else:
            dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size,
                                    **timeout)
    return dist.get_rank(), dist.get_world_size()


def _restart_store(timeout_s: float | None) -> dist.Store | None:
    """The store for a rank of an elastic launch: torchrun's agent store under a prefix of this restart's own.

    torchrun keeps one store server for all restarts of a `--max-restarts` launch and, unlike its other rendezvous
    paths, hands each restart the bare store: a rank of the new group can then read the address a dead rank of
    the previous group published and fail to connect ("Gloo connectFullMesh failed ... Connection refused").
    Keys under `scalelm/attempt_<TORCHELASTIC_RESTART_COUNT>` cannot be stale. None outside such a launch (the
    default env:// rendezvous is right there)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else dist.constants.default_pg_timeout
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timeout)
    return dist.PrefixStore(f"scalelm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def release_process_groups() -> None:
    """Destroy the process groups so that gloo's worker threads are joined now, while Python is alive: a gloo
    thread still running at interpreter shutdown can abort a rank after a finished run ("terminate called without
    an active exception", torchrun exit 1). destroy_process_group joins a group's threads only once nothing else
    holds the group, so first this drops what torch.distributed keeps on its own:

    - its caches of device meshes and specs: DTensor's sharding propagation and redistribute plans, the mesh
      topology (functools caches keyed by specs and meshes);
    - default arguments that hold the default group: ZeroRedundancyOptimizer's module and
      torch.distributed.nn.functional write `group=dist.group.WORLD` in signatures, evaluated once, at import. A
      module imported after init_process_group (ZeRO-1 imports ZeroRedundancyOptimizer when it builds its
      optimizer) keeps that group for good. They become None, which these functions read as the default group,
      as they would be had the module been imported first.

    tests/parallel/test_teardown.py checks that no gloo thread is left after TP, FSDP, DDP, ZeRO-1 and PP runs."""
    for obj in gc.get_objects():
        kind = type(obj)
        if kind not in (functools._lru_cache_wrapper, types.FunctionType):
            continue
        if not str(getattr(obj, "__module__", "")).startswith("torch.distributed"):
            continue
        if kind is functools._lru_cache_wrapper:
            obj.cache_clear()
        else:
            _drop_group_defaults(obj)
    for module, name in (("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),  # incl. the C++ one
                         ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache")):
        try:
            clear = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # private names, not in every torch version
            continue
        clear()
    gc.collect()  # the model, optimizer and meshes sit in reference cycles (hooks, specs)
    dist.destroy_process_group()
    gc.collect()


def _drop_group_defaults(fn: types.FunctionType) -> None:
    """Replace the process groups among `fn`'s default arguments with None (the default group)."""
    if fn.__defaults__ and any(isinstance(v, dist.ProcessGroup) for v in fn.__defaults__):
        fn.__defaults__ = tuple(None if isinstance(v, dist.ProcessGroup) else v for v in fn.__defaults__)
    if fn.__kwdefaults__ and any(isinstance(v, dist.ProcessGroup) for v in fn.__kwdefaults__.values()):
        fn.__kwdefaults__ = {k: None if isinstance(v, dist.ProcessGroup) else v for k, v in fn.__kwdefaults__.items()}


def rank0_choice(value):
    """`value` as rank 0 has it: a choice each rank makes from its own measurements (the faster GEMM backend or
    precision, a run's length) must be the same everywhere. A collective when a process group is up (call it on
    every rank); `value` itself in a single process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class Parallel:
    dims: ParallelDims
    mesh: DeviceMesh
    parts: list[nn.Module]
    schedule: object | None = None
    has_first_stage: bool = True
    has_last_stage: bool = True
    tied: TiedEmbeddings | None = None
    coords: dict[str, int] = field(default_factory=dict)
    stage_ids: list[int] = field(default_factory=lambda: [0])
    stage_owners: list[int] = field(default_factory=lambda: [0])

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        return self.mesh["tp"] if self.dims.tp > 1 else None

    @property
    def pp_group(self):
        return self.mesh["pp"].get_group() if self.dims.pp > 1 else None

    def loss_context(self):
        """loss_parallel when the head's logits are sharded on the vocabulary (TP), else nothing."""
        return loss_parallel() if self.dims.tp > 1 else contextlib.nullcontext()

    def sum_over_dp_pp(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a per-rank partial loss over data-parallel ranks and pipeline stages (not TP: it is replicated)."""
        value = value.detach().clone()
        dist.all_reduce(value, group=self.dims.flat["pp_dp"].get_group())
        return value

    def grad_sync(self, model: nn.Module, sync: bool):
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
        if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def reshard(self) -> None:
        """Free gathered FSDP parameters. Needed after a forward without backward (evaluation) under ZeRO-2,
        where nothing else reshards them — and the optimizer and checkpoints see the sharded parameters."""
        for part in self.parts:
            for module in part.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def pipeline_forward(self, x: torch.Tensor, hidden_shape: tuple[int, ...]) -> torch.Tensor | None:
        """Forward-only pass of a whole batch through the pipeline (evaluation); output on the last stage."""
        return forward_only(self.parts, self.stage_ids, self.stage_owners, self.pp_group, x, hidden_shape)

    def tied_copies(self) -> list[nn.Parameter]:
        return [self.tied.last] if self.tied is not None and self.tied.last is not None else []

    def norm_params(self) -> list[nn.Parameter]:
        """Parameters counted in the global gradient norm: the tied head copy on the last stage counts once."""
        skip = {id(self.tied.last)} if self.tied is not None and self.tied.last is not None else set()
        seen, out = set(), []
        for part in self.parts:
            for p in part.parameters():
                if id(p) not in seen and id(p) not in skip and p.requires_grad:
                    seen.add(id(p))
                    out.append(p)
        return out


def parallelize(model: nn.Module, cfg: Config, dims: ParallelDims, mesh: DeviceMesh, device: torch.device,
                loss_fn=None) -> Parallel:
    """`model` is the full model on the meta device (then only this rank's shards are ever allocated, after FSDP,
    with the single-process initial weights of the run seed: materialize.py), or materialized and identical on
    every rank (a model a `prepare_model` hook changed)."""
    p = cfg.parallel
    meta = is_meta(model)
    coords = coordinates(mesh, dims.flat["dp"])
    # 1. PP split
    if dims.pp > 1:
        ids, parts = split_model(model, coords["pp"], dims.pp, dims.stages_per_rank, p.pp_schedule)
    else:
        ids, parts = [0], [model]
    n_stages = dims.pp * dims.stages_per_rank if dims.pp > 1 else 1
    for part in parts:
        # 2. TP (+ sequence parallel)
        if dims.tp > 1:
            apply_tp(part, mesh["tp"], p.sequence_parallel)
        # 3. activation checkpointing
        apply_ac(part, p.activation_checkpoint, p.ac_every)
        # 4. compile, block by block
        if cfg.train.compile:
            for block in part.layers.values():
                block.compile()
            log.info("compiled %d blocks", len(part.layers))
        # 5. FSDP (DDP after materialization: it broadcasts rank 0's weights when it wraps)
        if dims.fsdp:
            dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
            apply_fsdp(part, dp_mesh, p.zero, p.cpu_offload, fsdp_dtypes(cfg))
    if meta:
        materialize(parts, device, cfg.seed)
    for i, part in enumerate(parts):
        if dims.ddp:
            parts[i] = apply_ddp(part, dims.flat["dp"], p.grad_compression, p.powersgd_rank, p.powersgd_start_step)
    par = Parallel(dims, mesh, parts, coords=coords)
    if dims.pp > 1:
        par.schedule = build_schedule(parts, ids, n_stages, mesh["pp"], device, p.pp_schedule, dims.microbatches,
                                      loss_fn)
        par.has_first_stage, par.has_last_stage = 0 in ids, n_stages - 1 in ids
        par.stage_ids, par.stage_owners = ids, stage_owners(dims.pp, dims.stages_per_rank, p.pp_schedule)
        if cfg.model.tie_embeddings:
            par.tied = TiedEmbeddings([unwrap(m) for m in parts], mesh, dims.pp, par.stage_owners[-1])
    return par


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT (or stage) inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---- gradient norm ----------------------------------------------------------------------------------
@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, pp_group=None, copies: list = ()) -> torch.Tensor:
    """Clip to the global L2 norm over all ranks: DTensor gradients (FSDP/TP shards) reduce over their mesh,
    plain ones are replicas; pipeline stages hold disjoint parameters, so their squared norms are summed.
    `copies` (a tied head's copy on the last stage) are scaled like the rest but not counted twice."""
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else "plain"
        groups.setdefault(key, []).append(g)
    total_sq = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq += norm.float() ** 2
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    # as torch.nn.utils.clip_grads_with_norm_, but per group: foreach ops do not mix DTensors and tensors
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for group in groups.values():
        torch._foreach_mul_(group, coef)
    for p in copies:
        if p.grad is not None:
            p.grad.mul_(coef)
    return total
