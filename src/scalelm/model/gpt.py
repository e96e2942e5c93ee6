"""A decoder-only Transformer in plain PyTorch — read it top to bottom.

No parallelism lives here: `scalelm.parallel` shards, wraps and splits this model from the outside. Blocks sit in
an `nn.ModuleDict` keyed "0", "1", ... so that a pipeline stage can delete the blocks it does not own while the
parameter names (and so the checkpoints) stay the same on every layout. The embedding, final norm and head may
be `None` on a pipeline stage that does not own them; `forward` then passes hidden states through.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scalelm.model.config import ModelConfig
from scalelm.model.cpu_attention import attention, use_kernel
from scalelm.model.embedding import Embedding
from scalelm.model.linear import Linear, linear
from scalelm.model.norm import RMSNorm


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim/2] for rotary position embedding (Su et al. 2021)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of x [B, heads, T, hd] by the angles of cos/sin [T, hd/2].

    Written as x·[cos, cos] + [x2, x1]·[−sin, sin]: four kernels instead of seven, which matters on CPUs where
    these memory-bound passes cost as much as a small matmul."""
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * torch.cat((cos, cos), dim=-1) + rotated * torch.cat((-sin, sin), dim=-1)


def sinusoidal_table(max_seq_len: int, d_model: int, device=None) -> torch.Tensor:
    """The fixed position table of Vaswani et al. 2017."""
    pos = torch.arange(max_seq_len, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_seq_len, d_model, device=device)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
    return table


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads: fp32 on CPU by scalelm's kernel (`cpu_attention`, which
    applies RoPE itself), otherwise by F.scaled_dot_product_attention.

    q, k and v stay three `nn.Linear`s (tensor parallelism splits each by heads, checkpoints name them), but when
    `fuse_projections` is set they run as one matmul over their concatenated weights, one [T, 3d] GEMM, a few
    percent faster on a 2-core CPU (bench/step_ab.py). `apply_tp` turns the fusion off, since each rank's slice of
    the concatenation would mix q, k and v.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.dim_head
        self.wq = Linear(cfg.d_model, cfg.n_head * cfg.dim_head, bias=cfg.bias)
        self.wk = Linear(cfg.d_model, cfg.kv_heads * cfg.dim_head, bias=cfg.bias)
        self.wv = Linear(cfg.d_model, cfg.kv_heads * cfg.dim_head, bias=cfg.bias)
        self.wo = Linear(cfg.n_head * cfg.dim_head, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.fuse_projections = True

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        rope = (rope[0][:seq], rope[1][:seq]) if rope is not None else None  # [T, hd/2]
        dropout = self.dropout if self.training else 0.0
        if self.fuse_projections:
            weight = torch.cat((self.wq.weight, self.wk.weight, self.wv.weight))
            bias = torch.cat((self.wq.bias, self.wk.bias, self.wv.bias)) if self.wq.bias is not None else None
            qkv = linear(x, weight, bias).view(bsz, seq, -1, self.head_dim)
            heads, kv_heads = self.n_head, self.n_kv_head
        else:
            # -1 instead of the head counts: under tensor parallelism each rank holds a slice of the heads.
            q, k, v = (proj(x).view(bsz, seq, -1, self.head_dim) for proj in (self.wq, self.wk, self.wv))
            qkv, heads, kv_heads = None, q.shape[2], k.shape[2]
        if use_kernel(qkv if qkv is not None else q, heads, kv_heads, dropout):  # fp32 CPU: scalelm's, with RoPE
            y = attention(qkv if qkv is not None else torch.cat((q, k, v), dim=2), heads, rope)
        else:
            if qkv is not None:
                q, k, v = qkv.split((heads, kv_heads, kv_heads), dim=2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if k.shape[1] != q.shape[1]:  # grouped-query: each kv head serves n_head / n_kv_head query heads
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        return self.wo(y.transpose(1, 2).reshape(bsz, seq, -1))


class MLP(nn.Module):
    """GELU MLP (w1 → gelu → w2) or SwiGLU (silu(w1 x) · w3 x → w2).

    Unlike q/k/v, w1 and w3 are not fused: measured on a 2-core CPU the [T, 2·ffn] output of one fused GEMM was
    no faster than two GEMMs (its buffer is large enough to be mapped fresh from the OS on every step)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        self.w1 = Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)
        self.w3 = Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias) if self.gated else None
        self.w2 = Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.resid_dropout(self.attention(self.attention_norm(x), rope))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    """tokens [B, T] → logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.norm = make_norm(cfg)
        self.output = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Non-persistent: recomputed by init_buffers(), never stored in checkpoints.
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.register_buffer("pos_table", None, persistent=False)
        self.init_buffers()
        self.init_weights()

    # ---- initialization (also called after building on the meta device and `to_empty`) ------------
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        cfg = self.cfg
        if device is None:
            device = self.output.weight.device if self.output is not None else "cpu"
        if cfg.pos == "rope":
            self.rope_cos, self.rope_sin = rope_tables(cfg.dim_head, cfg.max_seq_len, cfg.rope_theta, device)
        elif cfg.pos == "sinusoidal":
            self.pos_table = sinusoidal_table(cfg.max_seq_len, cfg.d_model, device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for matrices and tables, zero biases, unit norms; residual outputs scaled
        by 1/sqrt(2·n_layer) so the residual stream's variance does not grow with depth (GPT-2)."""
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_resid = name.endswith("attention.wo") or name.endswith("mlp.w2")
                nn.init.normal_(module.weight, mean=0.0, std=resid_std if is_resid else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (or hidden states [B, T, d] on a later pipeline stage) → logits or hidden states."""
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)
            if self.pos_embeddings is not None:
                h = h + self.pos_embeddings(torch.arange(tokens.shape[1], device=tokens.device))
            elif self.pos_table is not None:
                h = h + self.pos_table[: tokens.shape[1]].to(h.dtype)
            h = self.emb_dropout(h)
        else:
            h = tokens
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        for block in self.layers.values():
            h = block(h, rope)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
        return h

    # ---- counting ---------------------------------------------------------------------------------
    def num_params(self, embeddings: bool = True) -> int:
        """Count of the parameters actually built (shared tensors once); see counting.num_params."""
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not embeddings and name.split(".")[0] in ("tok_embeddings", "pos_embeddings", "output"):
                continue
            total += p.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        from scalelm.model.counting import flops_per_token

        return flops_per_token(self.cfg, seq_len)
