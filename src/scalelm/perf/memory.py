"""Memory per device: model states (ZeRO), activations (Korthikanti 2022), logits, buffers, margin.

Model states, mixed-precision Adam (Rajbhandari et al. 2020, sec. 3): 2Ψ bf16 weights, 2Ψ gradients and
KΨ optimizer states (K = 12: fp32 master weights, momentum, variance); ZeRO stage 1 shards the optimizer,
stage 2 also the gradients, stage 3 also the weights, each over the N data-parallel ranks.

Activations per layer, bytes, 2-byte activations (Korthikanti et al. 2022, Table 2), with s sequence,
b micro-batch, h hidden, a heads, t tensor-parallel size:

    no parallelism                    sbh(34 + 5as/h)
    tensor parallel                   sbh(10 + 24/t + 5as/(ht))
    tensor + sequence parallel        sbh(34/t + 5as/(ht))
    tensor parallel + selective       sbh(10 + 24/t)
    tensor + sequence + selective     sbh(34/t)
    full recompute                    2sbh

`layer_activation_bytes` generalizes the same accounting to GQA, SwiGLU, no dropout and fused attention,
and reduces to the table for a GPT block (tests pin both).
"""

from __future__ import annotations

from dataclasses import dataclass

from scalelm.model.config import ModelConfig


def korthikanti_activation_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                                 recompute: str = "none") -> float:
    """Table 2 of Korthikanti 2022, per layer, bytes."""
    sbh = s * b * h
    attn = 5 * a * s / (h * t)
    if recompute == "full":
        return 2.0 * sbh
    if t == 1 and not sp:
        return sbh * (34 + (5 * a * s / h if recompute == "none" else 0))
    base = 34 / t if sp else 10 + 24 / t
    return sbh * (base + (attn if recompute == "none" else 0))


def zero_model_state_bytes(psi: float, zero: int, n: int, k: int = 12, grad_bytes: int = 2) -> dict[str, float]:
    """Per-device parameter, gradient and optimizer bytes for ZeRO stage 0-3 over n ranks (ZeRO Fig. 1)."""
    params, grads, opt = 2.0 * psi, grad_bytes * psi, k * psi
    if zero >= 1:
        opt /= n
    if zero >= 2:
        grads /= n
    if zero >= 3:
        params /= n
    return {"params": params, "grads": grads, "optimizer": opt}


def layer_activation_bytes(cfg: ModelConfig, s: int, b: int, t: int = 1, sp: bool = False,
                           recompute: str = "none", flash: bool = True, dropout: bool = False,
                           selective_kind: str = "attention") -> float:
    """Bytes one block keeps for its backward on one TP rank (s = tokens per sequence on this CP rank).

    Replicated across TP unless SP: the two norm inputs, the QKV and MLP inputs (2sbh each) and the
    two dropout masks (sbh each). Split by TP: Q, K, V, the attention-output input, the MLP up output(s)
    and the activation output; without a fused kernel also the scores: softmax output 2as²b, dropout
    mask as²b and dropout output 2as²b (only the softmax output when dropout is off).
    """
    h, hd, nh, kv, f = cfg.d_model, cfg.dim_head, cfg.n_head, cfg.kv_heads, cfg.ffn_hidden
    sb = s * b
    if recompute == "full":
        return 2.0 * sb * h / (t if sp else 1)
    replicated = 8 * sb * h + (2 * sb * h if dropout else 0)
    up = 2 * f if cfg.mlp == "swiglu" else f
    split = 2 * sb * (nh * hd + 2 * kv * hd) + 2 * sb * h + 2 * sb * up + 2 * sb * f
    scores = 0.0
    if not flash:
        scores = nh * s * s * b * (5 if dropout else 2)
    if recompute == "selective" and selective_kind == "op":
        # torchtitan op-level SAC: the block input, every other matmul output and the attention output.
        mm_out = sb * ((nh * hd + 2 * kv * hd) + h + up + h) * 2
        return (2 * sb * h + 0.5 * mm_out + 2 * sb * h) / t
    if recompute == "selective":
        scores = 0.0
    return (replicated / t if sp else replicated) + (split + scores) / t


@dataclass
class MemoryBreakdown:
    """Bytes on the busiest device, by kind; `peak_stage` is the pipeline stage that holds the peak."""

    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    buffers: float
    margin: float
    peak_stage: str
    outside_allocator: float = 0.0
    """The part of `buffers` that PyTorch's caching allocator never sees (NCCL's channel buffers, allocated by NCCL
    itself): it takes device memory, but no allocated/reserved counter reports it."""

    @property
    def total(self) -> float:
        return (self.params + self.grads + self.optimizer + self.activations + self.logits + self.buffers
                + self.margin)

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated reports at the peak: live tensors only, without the allocator margin
        (fragmentation shows in reserved memory) and without the buffers outside the allocator."""
        return (self.params + self.grads + self.optimizer + self.activations + self.logits + self.buffers
                - self.outside_allocator)

    def gib(self) -> dict[str, float]:
        g = 2.0**30
        return {k: round(v / g, 2) for k, v in (
            ("params", self.params), ("grads", self.grads), ("optimizer", self.optimizer),
            ("activations", self.activations), ("logits", self.logits), ("buffers", self.buffers),
            ("margin", self.margin), ("total", self.total))}


ALLOCATOR_MARGIN = 0.05
"""PyTorch's caching allocator: peak *allocated* sits ~5% under what it must be able to place because of
fragmentation of the block pool; `reserved` adds more on top (see RESERVED_OVER_ALLOCATED)."""

RESERVED_OVER_ALLOCATED = 1.08
"""Peak reserved / peak allocated of the caching allocator on large-model training, ~1.05-1.15 (PyTorch
memory-snapshot studies); used only to compare with runs that report reserved memory."""
