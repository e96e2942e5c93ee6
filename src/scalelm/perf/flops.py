"""FLOPs and bytes of one Transformer layer, by kernel, for a micro-batch on one tensor-parallel rank.

Model FLOPs per token come from `scalelm.model.counting` (6·N_matmul + 12·L·T·H·d_head, full attention
square). This file adds what a *time* model needs: the shape of every GEMM (so efficiency can depend on
it), the attention core as the kernel actually runs it (causal half, FlashAttention's recompute in the
backward), and the bytes of the memory-bound elementwise work that FLOP counts ignore. It also carries
the published closed forms the literature uses, so tests can pin them:

* Narayanan et al. 2021 (SC21), eq. 3: FLOPs per iteration with full recomputation
  ``96·B·s·L·h²·(1 + s/(6h) + V/(16·L·h))``.
* Korthikanti et al. 2022, sec. 6: model FLOPs (no recomputation) ``72·B·s·L·h²·(1 + s/(6h) + V/(12·L·h))``.
"""

from __future__ import annotations

from dataclasses import dataclass

from scalelm.model.config import ModelConfig


def narayanan_flops_per_iteration(batch: int, seq: int, layers: int, hidden: int, vocab: int,
                                  recompute: bool = True) -> float:
    """Narayanan 2021 eq. 3 (full recomputation: 4 passes) or 3 passes without recomputation.

    Per layer and token: 24h² + 4sh forward matmul FLOPs; the logit layer adds 2hV forward; the
    backward is 2x the forward and full recomputation adds one more forward.
    """
    passes = 4 if recompute else 3
    b, s, l, h, v = batch, seq, layers, hidden, vocab
    return passes * b * s * (24 * l * h * h + 4 * l * s * h) + 3 * 2 * b * s * h * v


def korthikanti_model_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """Korthikanti 2022 model FLOPs per iteration: 72·B·s·L·h²·(1 + s/(6h) + V/(12·L·h))."""
    b, s, l, h, v = batch, seq, layers, hidden, vocab
    return 72.0 * b * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))


@dataclass(frozen=True)
class Gemm:
    """One forward GEMM C[m,n] = A[m,k]·B[k,n]; its backward runs dgrad (m,k,n) and wgrad (k,n,m)."""

    name: str
    m: int
    n: int
    k: int

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k


def layer_gemms(cfg: ModelConfig, tokens: int, tp: int, fused_qkv: bool = True, fused_gate_up: bool = True) -> list[Gemm]:
    """The forward GEMMs of one block on one TP rank (Megatron column/row split), `tokens` rows.

    The FLOPs are the same either way, but a framework that runs q, k and v (or SwiGLU's gate and up) as separate
    matmuls gets narrower outputs and, in the backward, smaller inner sizes, which run slower (compute.gemm_time_s)."""
    h, hd, nh, kv, f = cfg.d_model, cfg.dim_head, cfg.n_head, cfg.kv_heads, cfg.ffn_hidden
    if fused_qkv:
        attn_in = [Gemm("qkv", tokens, (nh * hd + 2 * kv * hd) // tp, h)]
    else:
        attn_in = [Gemm("q", tokens, nh * hd // tp, h), Gemm("k", tokens, kv * hd // tp, h),
                   Gemm("v", tokens, kv * hd // tp, h)]
    if cfg.mlp != "swiglu":
        mlp_in = [Gemm("mlp_up", tokens, f // tp, h)]
    elif fused_gate_up:
        mlp_in = [Gemm("mlp_up", tokens, 2 * f // tp, h)]
    else:
        mlp_in = [Gemm("mlp_gate", tokens, f // tp, h), Gemm("mlp_up", tokens, f // tp, h)]
    return [*attn_in, Gemm("attn_out", tokens, h, nh * hd // tp), *mlp_in, Gemm("mlp_down", tokens, h, f // tp)]


def block_matrices(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(rows, cols) of every weight matrix of one block: q, k, v, o, and the MLP's up (gate) and down."""
    h, hd, nh, kv, f = cfg.d_model, cfg.dim_head, cfg.n_head, cfg.kv_heads, cfg.ffn_hidden
    mats = [(nh * hd, h), (kv * hd, h), (kv * hd, h), (h, nh * hd), (f, h), (h, f)]
    return mats + ([(f, h)] if cfg.mlp == "swiglu" else [])


def newton_schulz_gemms(cfg: ModelConfig, steps: int = 5) -> list[Gemm]:
    """GEMMs of Muon's orthogonalization for one block (Jordan et al. 2024; torch.optim.Muon): per matrix,
    transposed to m ≤ n, each of `steps` quintic iterations runs A = X·Xᵀ (m·m·n), B = A·A (m·m·m) and
    X ← a·X + (b·A + c·B)·X (m·n·m)."""
    out = []
    for rows, cols in block_matrices(cfg):
        m, n = min(rows, cols), max(rows, cols)
        out += [Gemm("ns_gram", m, m, n), Gemm("ns_square", m, m, m), Gemm("ns_update", m, n, m)] * steps
    return out


def head_gemm(cfg: ModelConfig, tokens: int, tp: int) -> Gemm:
    """The output projection to the vocabulary (vocab-parallel over TP)."""
    return Gemm("lm_head", tokens, -(-cfg.vocab_size // tp), cfg.d_model)


def attention_core_flops(cfg: ModelConfig, batch: int, seq: int, tp: int = 1, cp: int = 1) -> float:
    """Forward QKᵀ and PV FLOPs over the full T×T square for one layer on one TP/CP rank: 4·b·s²·H·d_head."""
    return 4.0 * batch * seq * seq * cfg.n_head * cfg.dim_head / (tp * cp)


def causal_fraction(seq: int, block: int = 128) -> float:
    """Share of the T×T square a causal block-sparse kernel (FlashAttention) computes: blocks on or below
    the diagonal, (n+1)/(2n) with n = T/block (1/2 for long sequences, more for short ones)."""
    n = max(1, -(-seq // block))
    return (n + 1) / (2 * n)


UNFUSED_RMSNORM_ELEMS = 18
"""Eager fp32 RMSNorm: x.float() r2+w4, pow r4+w4, mean r4, mul r4+w4, to bf16 r4+w2, *weight r2+w2 =
36 bytes per element = 18 bf16-sized passes."""


def elementwise_bytes_per_token(cfg: ModelConfig, act_bytes: int = 2, fused_norm: bool = True,
                                stream_bytes: int | None = None, fused_qkv: bool = True,
                                attention_kernel: bool = False) -> float:
    """HBM bytes one layer's unfused memory-bound ops move per token in the forward pass.

    Counted reads+writes: two norms (2h each), two residual adds (3h each), the MLP activation
    (GELU 2f, SwiGLU 3f), RoPE on q and k (2·(H+KV)·d_head), and layout copies of q, k, v and the
    attention output (2·(H + 2·KV)·d_head + 2h). The backward moves about twice that. An RMSNorm written
    in plain PyTorch (upcast, pow, mean, rsqrt, two multiplies, downcast) is seven kernels moving ~18
    activation-sized passes instead of 2 (`fused_norm=False`).

    `stream_bytes` (default `act_bytes`): the element size of the residual stream where it differs from the
    matmul outputs' -- autocast over fp32 weights keeps the stream, the norms and the residual adds in fp32
    while q/k/v, the MLP activation and the attention output are bf16, and casts each norm output once per
    matmul that reads it (see `replicated_elementwise_bytes_per_token`).

    `attention_kernel`: scalelm's fp32 CPU attention (frameworks.Framework.fp32_attention_kernel) rotates q and k
    itself and reads and writes the projections' layouts: no RoPE pass and no layout copies, except the
    concatenation of three separate q, k, v projections (`fused_qkv=False`) into the one tensor it reads.
    """
    h, hd, nh, kv, f = cfg.d_model, cfg.dim_head, cfg.n_head, cfg.kv_heads, cfg.ffn_hidden
    matmul_outputs = 3 * f if cfg.mlp == "swiglu" else 2 * f
    if attention_kernel:
        matmul_outputs += 0 if fused_qkv else 2 * (nh + 2 * kv) * hd
    else:
        if cfg.pos == "rope":
            matmul_outputs += 2 * (nh + kv) * hd
        matmul_outputs += 2 * (nh + 2 * kv) * hd + 2 * h
    stream = act_bytes if stream_bytes is None else stream_bytes
    replicated = replicated_elementwise_bytes_per_token(cfg, stream, fused_norm, act_bytes, fused_qkv)
    return replicated + matmul_outputs * act_bytes


def replicated_elementwise_bytes_per_token(cfg: ModelConfig, act_bytes: int = 2, fused_norm: bool = True,
                                           matmul_bytes: int | None = None, fused_qkv: bool = True) -> float:
    """The part of `elementwise_bytes_per_token` that tensor parallelism without sequence parallelism does not
    split: the two norms and the two residual adds run on the full hidden size on every TP rank (`act_bytes`:
    the residual stream's element size). Where the matmuls run in another precision (`matmul_bytes`, autocast),
    each matmul reading a norm output casts it first -- q/k/v (one fused or three), w1 (and w3): read in the
    stream's precision, written in the matmul's."""
    h = cfg.d_model
    norm = 2 * h if fused_norm else UNFUSED_RMSNORM_ELEMS * h
    stream = (2 * norm + 2 * 3 * h) * act_bytes
    if matmul_bytes is None or matmul_bytes == act_bytes:
        return stream
    readers = (1 if fused_qkv else 3) + (2 if cfg.mlp == "swiglu" else 1)
    return stream + readers * h * (act_bytes + matmul_bytes)


def softmax_bytes_per_token(cfg: ModelConfig, seq: int, dropout: bool) -> float:
    """Unfused (non-flash) attention: bytes per token per layer of the scale-mask-softmax (+dropout) kernels
    over the H×T score rows, forward only: fused softmax reads and writes 2 bytes per score, dropout reads
    2, writes 2 plus a 1-byte mask (Megatron's fused kernels)."""
    per_score = 4 + (5 if dropout else 0)
    return cfg.n_head * seq * per_score


def logits_bytes_per_token(cfg: ModelConfig) -> float:
    """Bytes per token of the loss: bf16 logits written, an fp32 upcast, log-softmax read/write, and the
    fp32 then bf16 gradient of the logits in the backward (~18 bytes per vocabulary entry)."""
    return 18.0 * cfg.vocab_size


def mfu(tokens_per_s_per_device: float, cfg: ModelConfig, seq: int, peak_flops: float) -> float:
    """Model FLOPs utilization (PaLM App. B convention: counting.flops_per_token, no recompute)."""
    from scalelm.model.counting import flops_per_token

    return tokens_per_s_per_device * flops_per_token(cfg, seq) / peak_flops
