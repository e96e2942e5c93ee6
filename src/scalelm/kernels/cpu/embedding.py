"""The token embedding, whose CPU backward is ATen's kernel rather than the one torch.compile writes.

Inductor compiles an embedding's backward (a scatter-add of every token's gradient row into the table) into a
loop of atomic vector adds; with a small vocabulary on a CPU every add contends. ATen's `embedding_dense_backward`
gives each thread its own rows of the table instead, and the same bits on any thread count. So on CPU the
backward is a custom op that torch.compile keeps whole; elsewhere (GPUs, DTensor tables) `ATenBackwardEmbedding`
is nn.Embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.library.custom_op("scalelm::embedding_backward", mutates_args=())
def embedding_backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int) -> torch.Tensor:
    """Gradient of the table [num_weights, d] from the output gradient [..., d] of a lookup of ids [...]."""
    return torch.ops.aten.embedding_dense_backward(grad, ids, num_weights, -1, False)


@embedding_backward.register_fake
def _(grad, ids, num_weights):
    return grad.new_empty(num_weights, grad.shape[-1])


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.num_weights = weight.shape[0]
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        return None, embedding_backward(grad.contiguous(), ids, ctx.num_weights)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.embedding(ids, weight)`, with ATen's backward where the table is a plain CPU tensor."""
    if type(weight) in (torch.Tensor, nn.Parameter) and weight.device.type == "cpu" and weight.requires_grad:
        return _Lookup.apply(ids, weight)
    return F.embedding(ids, weight)


class ATenBackwardEmbedding(nn.Embedding):
    """`nn.Embedding` whose forward is `embedding`: same parameters, same state dict."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.padding_idx is not None or self.max_norm is not None or self.sparse or self.scale_grad_by_freq:
            return super().forward(ids)
        return embedding(ids, self.weight)
