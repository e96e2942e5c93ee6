"""Data parallelism: FSDP2 (ZeRO-2/3, HSDP) and DDP (ZeRO-0, ZeRO-1 with a sharded optimizer), with DDP
communication hooks for gradient compression.

| zero | what is sharded over data-parallel ranks       | built from                                     |
|------|------------------------------------------------|------------------------------------------------|
| 0    | nothing: gradients all-reduced                 | DistributedDataParallel                        |
| 1    | optimizer states                               | DDP + ZeroRedundancyOptimizer                  |
| 2    | optimizer states, gradients                    | fully_shard(reshard_after_forward=False)       |
| 3    | optimizer states, gradients, parameters        | fully_shard(reshard_after_forward=True)        |
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger("scalelm.parallel")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_dtypes(cfg) -> tuple[torch.dtype, torch.dtype]:
    """(parameter dtype, gradient-reduction dtype) of FSDP's communication, from parallel.fsdp_param_dtype and
    parallel.fsdp_reduce_dtype; "auto" parameters follow train.dtype when it is bf16, else stay fp32."""
    p = cfg.parallel
    param = p.fsdp_param_dtype
    if param == "auto":
        param = "bf16" if cfg.train.dtype == "bf16" else "fp32"
    return DTYPES[param], DTYPES[p.fsdp_reduce_dtype]


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, zero: int, cpu_offload: bool = False,
               dtypes: tuple[torch.dtype, torch.dtype] = (torch.float32, torch.float32)) -> None:
    """fully_shard each block, then the root (embedding, final norm, head). `dp_mesh` is 1-D (FSDP) or
    2-D ("dp_replicate", "dp_shard") for HSDP: sharded within a replica group, all-reduced across groups.
    `dtypes` = (parameters, gradient reduction): the fp32 shards stay the master weights the optimizer updates;
    with bf16 parameters every all-gather moves half the bytes and the blocks compute on the bf16 copies, while
    gradients are reduced (and accumulated) in the reduction dtype."""
    reshard = zero >= 3  # ZeRO-2: keep the gathered parameters from forward to backward (no second all-gather)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    param_dtype, reduce_dtype = dtypes
    mixed = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: never reshard them.
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard and i < len(blocks) - 1,
                    offload_policy=offload, mp_policy=mixed)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, offload_policy=offload, mp_policy=mixed)
    # Each rank's loss is already divided by the GLOBAL token count: gradients must be summed over ranks, not
    # averaged (FSDP's default). A divide factor of 1 is a plain SUM; forcing sum-type collectives keeps FSDP
    # from asking gloo for PREMUL_SUM, which it lacks.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    kind = "HSDP" if dp_mesh.ndim == 2 and min(dp_mesh.mesh.shape) > 1 else "FSDP2"
    log.info("applied %s (ZeRO-%d%s, parameters %s, reduction %s) over mesh %s", kind, zero,
             ", CPU offload" if cpu_offload else "", param_dtype, reduce_dtype,
             dict(zip(dp_mesh.mesh_dim_names, dp_mesh.mesh.shape)))


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, compression: str = "none", powersgd_rank: int = 4,
              powersgd_start_step: int = 10) -> DistributedDataParallel:
    """Wrap `model` in DDP over the flattened data-parallel mesh, with a gradient communication hook."""
    group = dp_mesh.get_group()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers: our buffers (RoPE tables) are
        ddp = DistributedDataParallel(model, process_group=group, broadcast_buffers=False)  # equal by construction
    # Each rank's loss is already divided by the GLOBAL token count, so gradients are summed over ranks. The
    # built-in hooks average; `_times(n)` undoes their division by the group size.
    if compression == "bf16":
        # Gradients travel as bf16 (8 bits of mantissa): half the bytes.
        ddp.register_comm_hook(group, _times(default_hooks.bf16_compress_hook, group.size()))
    elif compression == "powersgd":
        # Rank-r factors P (n×r), Q (m×r) of each n×m gradient are all-reduced instead of the matrix; the
        # approximation error is fed back into the next step's gradient (error feedback), so nothing is lost
        # for good. Vectors and small matrices travel uncompressed.
        state = powerSGD_hook.PowerSGDState(process_group=group, matrix_approximation_rank=powersgd_rank,
                                            start_powerSGD_iter=max(2, powersgd_start_step), use_error_feedback=True,
                                            warm_start=True, random_seed=0)
        # PowerSGD all-reduces Q from a callback of P's all-reduce. On gloo callbacks run in a worker thread, so
        # with several buckets two ranks could issue bucket 1's Q and bucket 2's P in different orders (a
        # collective mismatch): there each bucket's hook waits for its own exchange to finish.
        serialize = dist.get_backend(group) == "gloo"
        ddp.register_comm_hook(state, _times(powerSGD_hook.powerSGD_hook, group.size(), serialize))
    else:
        # A plain summing all-reduce, from Python, so CommCounter sees it like every other collective.
        ddp.register_comm_hook(group, sum_allreduce_hook)
    log.info("applied DDP over %d ranks, gradient compression %s", dp_mesh.size(), compression)
    return ddp


def sum_allreduce_hook(group, bucket):  # (no annotation: DDP checks it against an object, not a string)
    """DDP hook: all-reduce (sum) the bucket's flat gradient buffer."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _times(hook, factor: int, serialize: bool = False):
    """A DDP hook whose result is multiplied by `factor` (turns an averaging hook into a summing one);
    `serialize` waits for the bucket's communication before the next bucket's hook can start."""
    def scaled(state, bucket):
        fut = hook(state, bucket).then(lambda f: f.value().mul_(factor))
        if serialize:
            fut.wait()
        return fut

    return scaled


def zero1_optimizer(optimizer_class, param_groups: list[dict], dp_mesh: DeviceMesh, **defaults):
    """ZeRO-1: each data-parallel rank keeps the optimizer states of a 1/dp slice of the parameters, steps it,
    and broadcasts the updated slice."""
    # Imported here, after init_process_group: the import keeps the default group in default arguments, which
    # release_process_groups drops so that the group can be destroyed.
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(param_groups, optimizer_class=optimizer_class, process_group=dp_mesh.get_group(),
                                   **defaults)


def local_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's states (ZeroRedundancyOptimizer keeps them in `.optim`)."""
    return getattr(opt, "optim", opt) if type(opt).__name__ == "ZeroRedundancyOptimizer" else opt
