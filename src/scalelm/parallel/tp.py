"""Tensor parallelism (Megatron layout) as declarative plans handed to `parallelize_module`.

Per block: q/k/v and the MLP up-projections (w1, w3) are split by column (output features = heads / hidden
units), the attention output wo and the MLP down-projection w2 by row, so each block needs one all-reduce in
forward per sub-layer. The token embedding is split over the vocabulary (rows) and the head over the vocabulary
(columns). In training the head's output stays sharded on the vocabulary and the loss is computed by
`loss_parallel` without ever gathering the logits; for generation (`loss_parallel=False`) the head all-gathers
them, so every rank samples from the full distribution. With sequence parallelism the norms (and the residual
stream between sub-layers) are sharded along the sequence: the all-reduces become reduce-scatter + all-gather
pairs.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

log = logging.getLogger("scalelm.parallel")


def root_plan(model: nn.Module, sequence_parallel: bool, loss_parallel: bool = True) -> dict[str, object]:
    """Plan for the embedding, final norm and head (those this pipeline stage owns). loss_parallel: the head's
    logits stay sharded on the vocabulary (training); False: every rank gets the full logits (generation)."""
    seq = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, object] = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if model.norm is not None and sequence_parallel:
        plan["norm"] = SequenceParallel()
    if model.output is not None and loss_parallel:
        # Local logits sharded on the vocabulary; the loss wraps them as DTensor(Shard(-1)) for loss_parallel.
        plan["output"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=True)
    elif model.output is not None:
        # Full logits on every rank (all-gathered on the vocabulary), as a plain tensor the sampler can read.
        plan["output"] = ColwiseParallel(input_layouts=seq, output_layouts=Replicate(), use_local_output=True)
    return plan


def block_plan(gated_mlp: bool, sequence_parallel: bool) -> dict[str, object]:
    """Plan for one Transformer block: which weight is split by column, which by row."""
    seq = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, object] = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=seq),
        "mlp.w1": ColwiseParallel(),
        "mlp.w2": RowwiseParallel(output_layouts=seq),
    }
    if gated_mlp:
        plan["mlp.w3"] = ColwiseParallel()
    # The sub-layer inputs enter as one DTensor shared by q/k/v (and w1/w3), so their three (two) partial input
    # gradients are summed locally and reduced once per sub-layer in backward (Megatron's f operator) instead of
    # once per projection. With sequence parallelism this is also where the sequence shards are all-gathered.
    # Only the positional inputs (x, rope) are converted: the keyword arguments `cache=` and `layer=` of the KV
    # cache pass through untouched, and the cache holds each rank's own kv heads as plain local tensors.
    plan.update({
        "attention": PrepareModuleInput(input_layouts=(seq, None), desired_input_layouts=(Replicate(), None)),
        "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
    })
    if sequence_parallel:
        plan.update({"attention_norm": SequenceParallel(), "mlp_norm": SequenceParallel()})
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool, loss_parallel: bool = True) -> None:
    """Shard `model` (a GPT or one pipeline stage of it) in place over `tp_mesh`. loss_parallel=True (training)
    leaves the logits sharded on the vocabulary for `loss_parallel`; False (generation) returns full logits."""
    tied = model.cfg.tie_embeddings and model.tok_embeddings is not None and model.output is not None
    parallelize_module(model, tp_mesh, root_plan(model, sequence_parallel, loss_parallel))
    if tied:
        # Both modules shard the shared table on dim 0 (vocabulary); parallelize_module made two DTensors of
        # it, so tie them again: one parameter, one gradient, as in the single-process model.
        model.output.weight = model.tok_embeddings.weight
    gated = model.cfg.mlp == "swiglu"
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan(gated, sequence_parallel))
    log.info("applied tensor parallelism over %d ranks%s", tp_mesh.size(),
             " with sequence parallelism" if sequence_parallel else "")
