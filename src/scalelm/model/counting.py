"""Closed-form parameter and FLOP counts of a ModelConfig (torch-free; the cluster model reuses them).

FLOP convention (stated once, used everywhere): a multiply-add is 2 FLOPs; training = forward + backward
= 3 × forward. Attention score (QKᵀ) and value (PV) matmuls are counted over the full T×T square — no causal
discount — as in PaLM (Chowdhery et al. 2022, App. B) and nanoGPT. Norms, activations, softmax and the
embedding lookup are not counted (they are not matmuls).
"""

from __future__ import annotations

from scalelm.model.config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    """Weights (and biases) of one attention block: q, k, v, o projections."""
    d, hd, h, kv = cfg.d_model, cfg.dim_head, cfg.n_head, cfg.kv_heads
    weights = d * h * hd + 2 * d * kv * hd + h * hd * d
    biases = (h * hd + 2 * kv * hd + d) if cfg.bias else 0
    return weights + biases


def mlp_params(cfg: ModelConfig) -> int:
    """Weights (and biases) of one MLP: 2 matrices for GELU, 3 for SwiGLU."""
    d, f = cfg.d_model, cfg.ffn_hidden
    n_in = 2 if cfg.mlp == "swiglu" else 1
    weights = n_in * d * f + f * d
    biases = (n_in * f + d) if cfg.bias else 0
    return weights + biases


def norm_params(cfg: ModelConfig) -> int:
    """One norm: a scale vector, plus a shift for LayerNorm with bias."""
    return cfg.d_model * (2 if (cfg.norm == "layernorm" and cfg.bias) else 1)


def block_params(cfg: ModelConfig) -> int:
    return attention_params(cfg) + mlp_params(cfg) + 2 * norm_params(cfg)


def embedding_params(cfg: ModelConfig) -> int:
    """Token table, learned position table and, when untied, the output head."""
    tables = cfg.vocab_size * cfg.d_model
    if cfg.pos == "learned":
        tables += cfg.max_seq_len * cfg.d_model
    if not cfg.tie_embeddings:
        tables += cfg.vocab_size * cfg.d_model
    return tables


def num_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Trainable parameters. `embeddings=False` drops the token/position tables and the output head
    (Kaplan et al. 2020's non-embedding count): what scales with depth and width."""
    body = cfg.n_layer * block_params(cfg) + norm_params(cfg)
    return body + (embedding_params(cfg) if embeddings else 0)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: all block matrices plus the output head."""
    d, hd, h, kv, f = cfg.d_model, cfg.dim_head, cfg.n_head, cfg.kv_heads, cfg.ffn_hidden
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * f
    return cfg.n_layer * (attn + mlp) + cfg.vocab_size * d


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token: 2·(matmul weights) + 4·L·T·(heads·head_dim) for QKᵀ and PV (full square)."""
    return 2.0 * matmul_params(cfg) + 4.0 * cfg.n_layer * seq_len * cfg.n_head * cfg.dim_head


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3× forward): 6·N_matmul + 12·L·T·H·d_head."""
    return 3.0 * forward_flops_per_token(cfg, seq_len if seq_len is not None else cfg.max_seq_len)


def weight_bytes(cfg: ModelConfig) -> dict[str, int]:
    """Bytes to hold the weights alone, by storage precision."""
    n = num_params(cfg)
    return {"fp32": 4 * n, "bf16": 2 * n, "fp16": 2 * n, "fp8": n, "int8": n, "int4": n // 2}
