"""Causal attention on CPU by scalelm's own kernel, where it beats PyTorch's flash attention.

PyTorch's CPU flash-attention kernel tiles queries in blocks of 32–64 rows and runs one small GEMM per tile pair,
far below a core's fp32 peak on a 64-wide head at a few hundred positions. There the [T, T] scores of one
(batch, head) pair fit a core's L2 cache, so `csrc/cpu_attention.cpp` gives each thread whole (batch, head) pairs,
runs BLAS GEMMs over all the keys a block of query rows may see (the causal upper-right blocks skipped), and keeps
one log-sum-exp per row for the backward, as FlashAttention-2 does. It also rotates q and k (RoPE) while they are
in cache and reads them where one fused q/k/v projection wrote them: no RoPE pass, no layout copies
(docs/benchmarks.md#training-throughput-and-cpu-kernels).

`KernelAttention` is the model's `Attention` with that forward: q/k/v as one matmul over the concatenated weights,
then the kernel; wherever the kernel does not apply (dropout, autocast, long sequences, a DTensor) the fused
projection feeds `F.scaled_dot_product_attention` as the plain model does, and generation with a KV cache takes
the plain model's forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

from scalelm.kernels.cpu import build
from scalelm.kernels.cpu.linear import onednn_linear, plain_fp32_cpu
from scalelm.model.gpt import Attention, KVCache, apply_rope

MAX_SEQ = 2048
"""Longer sequences go to flash attention, whose tiling is made for them."""
BLOCK = 64
"""Query rows per block: the causal triangle is skipped in 64-row steps (the best of 64, 128 and 256)."""


@torch.library.custom_op("scalelm::cpu_attention_fwd", mutates_args=())
def attention_fwd(qkv: torch.Tensor, heads: int, cos: torch.Tensor | None, sin: torch.Tensor | None, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the packed projection qkv [B, T, H + 2·KV, D] (q heads, then k, then v), q and k
    first rotated by cos, sin [T, D/2] when given: (out [B, H, T, D], log-sum-exp [B, H, T])."""
    out, lse = torch.ops.scalelm_cpu_attention.forward(qkv, heads, cos, sin, scale, BLOCK)
    return out, lse


@attention_fwd.register_fake
def _(qkv, heads, cos, sin, scale):
    b, t, _, d = qkv.shape
    return qkv.new_empty(b, t, heads, d).transpose(1, 2), qkv.new_empty(b, heads, t)


@torch.library.custom_op("scalelm::cpu_attention_bwd", mutates_args=())
def attention_bwd(grad_out: torch.Tensor, qkv: torch.Tensor, lse: torch.Tensor, heads: int,
                  cos: torch.Tensor | None, sin: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The gradient with respect to qkv, packed like it (no concatenation of three gradients afterwards)."""
    return torch.ops.scalelm_cpu_attention.backward(grad_out, qkv, lse, heads, cos, sin, scale, BLOCK)


@attention_bwd.register_fake
def _(grad_out, qkv, lse, heads, cos, sin, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    qkv, heads, cos, sin, scale = inputs
    _, lse = output  # the output itself is not needed: the kernel's backward does without it
    ctx.save_for_backward(qkv, lse, cos, sin)
    ctx.heads, ctx.scale = heads, scale


def _backward(ctx, grad_out, grad_lse):
    qkv, lse, cos, sin = ctx.saved_tensors
    return attention_bwd(_rows(grad_out), qkv, lse, ctx.heads, cos, sin, ctx.scale), None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _shapes(qkv_shape, heads: int):
    """q, k, v shapes [B, H, T, D] as flash attention sees them, grouped kv heads repeated: FLOPs per query head."""
    b, t, _, d = qkv_shape
    return (b, heads, t, d), (b, heads, t, d), (b, heads, t, d)


@register_flop_formula(torch.ops.scalelm.cpu_attention_fwd)
def _fwd_flops(qkv_shape, heads, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode counts the kernel's model FLOPs as PyTorch counts SDPA's: the full T × T square."""
    return sdpa_flop_count(*_shapes(qkv_shape, heads))


@register_flop_formula(torch.ops.scalelm.cpu_attention_bwd)
def _bwd_flops(grad_shape, qkv_shape, lse_shape, heads, *args, out_shape=None, **kwargs) -> int:
    """Twice the forward: the recomputed scores are not model FLOPs (PyTorch's flash formula counts them)."""
    return 2 * sdpa_flop_count(*_shapes(qkv_shape, heads))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t itself where the kernel can read it (rows of D contiguous floats, every other stride at least D, as BLAS
    leading dimensions must be), else a contiguous copy: a broadcast gradient has stride 0 over positions."""
    d = t.shape[-1]
    ok = t.stride(-1) == 1 and all(st >= d or n == 1 for st, n in zip(t.stride()[:-1], t.shape[:-1]))
    return t if ok else t.contiguous()


def use_kernel(x: torch.Tensor, heads: int, kv_heads: int, dropout_p: float) -> bool:
    """Whether `attention` may run for projections like x [B, T, heads, D] (q's, or the packed qkv)."""
    if dropout_p != 0.0 or torch.is_autocast_enabled("cpu"):
        return False
    if not plain_fp32_cpu(x) or x.dim() != 4:
        return False
    return (0 < x.shape[1] <= MAX_SEQ and x.shape[0] > 0 and 0 < kv_heads and heads % kv_heads == 0
            and build.available())


def attention(qkv: torch.Tensor, heads: int, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention by scalelm's kernel (check `use_kernel` first) over qkv [B, T, H + 2·KV, D], q's H heads
    first, then k's and v's KV (grouped-query: H a multiple of KV); q and k rotated first by rope = (cos, sin)
    [T, D/2] when given.

    The result is [B, H, T, D] laid out as [B, T, H, D] in memory, so merging the heads afterwards is a view."""
    cos, sin = (rope[0].float().contiguous(), rope[1].float().contiguous()) if rope is not None else (None, None)
    out, _ = attention_fwd(_rows(qkv), heads, cos, sin, 1.0 / math.sqrt(qkv.shape[-1]))
    return out


class KernelAttention(Attention):
    """`Attention` with q/k/v fused into one matmul and scalelm's causal kernel; same parameters and state dict.

    `onednn` routes the fused projection through oneDNN as `OneDNNLinear` would (apply_cpu_kernels sets it)."""

    onednn: bool = False

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        if cache is not None:  # generation: the plain path, which reads and writes the cache
            return super().forward(x, rope, cache=cache, layer=layer)
        bsz, seq, _ = x.shape
        dropout = self.dropout if self.training else 0.0
        weight = torch.cat((self.wq.weight, self.wk.weight, self.wv.weight))
        bias = torch.cat((self.wq.bias, self.wk.bias, self.wv.bias)) if self.wq.bias is not None else None
        qkv = (onednn_linear if self.onednn else F.linear)(x, weight, bias).view(bsz, seq, -1, self.head_dim)
        heads, kv_heads = self.n_head, self.n_kv_head
        if use_kernel(qkv, heads, kv_heads, dropout):
            y = attention(qkv, heads, rope)
        else:
            q, k, v = (t.transpose(1, 2) for t in qkv.split((heads, kv_heads, kv_heads), dim=2))  # [B, h, T, hd]
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if kv_heads != heads:
                k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        return self.wo(y.transpose(1, 2).reshape(bsz, seq, -1))
