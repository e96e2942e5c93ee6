"""A decoder-only Transformer in plain PyTorch — read it top to bottom.

No parallelism and no device-specific code lives here: `scalelm.parallel` shards, wraps and splits this model, and
`scalelm.kernels` swaps in faster modules for a device, both from the outside. Blocks sit in
an `nn.ModuleDict` keyed "0", "1", ... so that a pipeline stage can delete the blocks it does not own while the
parameter names (and so the checkpoints) stay the same on every layout. The embedding, final norm and head may
be `None` on a pipeline stage that does not own them; `forward` then passes hidden states through.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from scalelm.model.config import ModelConfig


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim/2] for rotary position embedding (Su et al. 2021)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def widen_rope(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The half tables cos/sin [..., hd/2] as the full-width factors [cos, cos] and [−sin, sin] of `apply_rope`."""
    cos, sin = cos.to(dtype), sin.to(dtype)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of x [B, heads, T, hd] by the angles of cos/sin [T, hd/2] (the
    same positions for every row) or [B, 1, T, hd/2] (each row its own, as in a left-padded batch); or by the
    full-width factors of `widen_rope` (hd wide), which a generation step builds once for all its layers.

    Written as x·[cos, cos] + [x2, x1]·[−sin, sin]: four elementwise passes instead of seven."""
    half = x.shape[-1] // 2
    if cos.shape[-1] != x.shape[-1]:
        cos, sin = widen_rope(cos, sin, x.dtype)
    rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def sinusoidal_table(max_seq_len: int, d_model: int, device=None) -> torch.Tensor:
    """The fixed position table of Vaswani et al. 2017."""
    pos = torch.arange(max_seq_len, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_seq_len, d_model, device=device)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
    return table


class KVCache:
    """Keys and values of every layer for `batch` sequences of up to `max_len` positions, written in place as
    tokens are decoded, so each new token attends to the past without recomputing it.

    Rows share slots: a batch of prompts of different lengths is left-padded to one length, and `pad[b]` says how
    many of row b's first slots hold padding. Padding is never attended to and a row's positions count from its
    first real token, so every row computes what it would alone. Before each forward of n tokens, `prepare(n)`
    sets the slots they go to, their positions and the attention mask; `advance()` after it makes them the past.
    Attention reads the whole buffer under the mask, so every decode step has the same shapes (one compiled graph
    serves them all). Buffers take the dtype, device and head count of the first keys written (a tensor-parallel
    rank's share)."""

    def __init__(self, n_layer: int, max_len: int, pad: torch.Tensor):
        self.max_len, self.pad, self.length = max_len, pad, 0
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.slots = self.positions = self.mask = None
        # What every forward slices from, built once: slot numbers, each row's positions, its non-padding slots.
        self._slots = torch.arange(max_len, device=pad.device)
        self._positions = (self._slots[None, :] - pad[:, None]).clamp(min=0)  # [B, max_len]
        self._real = (self._slots[None, :] >= pad[:, None])[:, None]  # [B, 1, max_len]

    def prepare(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {self.length} + {n_new} do not fit")
        end = self.length + n_new
        self.slots = self._slots[self.length:end]
        self.positions = self._positions[:, self.length:end]  # [B, T]
        own = self._slots[None, :] == self.slots[:, None]  # [T, max_len]: a pad slot sees itself, so no NaN
        causal = self._slots[None, :] <= self.slots[:, None]
        self.mask = ((causal & self._real) | own)[:, None]  # [B, 1, T, max_len]: causal, no padding

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's k, v [B, kv_heads, T, hd] of `layer`; return its whole buffers."""
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys[layer], self.values[layer] = k.new_zeros(shape), v.new_zeros(shape)
        self.keys[layer].index_copy_(2, self.slots, k)
        self.values[layer].index_copy_(2, self.slots, v)
        return self.keys[layer], self.values[layer]

    def advance(self) -> None:
        self.length += len(self.slots)

    def rewind(self, length: int) -> None:
        """Forget every slot from `length` on (speculative decoding drops the draft tokens the target rejected)."""
        self.length = min(self.length, length)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (n_kv_head k/v heads, each shared by n_head / n_kv_head
    query heads) by F.scaled_dot_product_attention; RoPE rotates q and k when the model uses it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.dim_head
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.dim_head, bias=cfg.bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.dim_head, bias=cfg.bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.dim_head, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_head * cfg.dim_head, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 instead of the head counts: under tensor parallelism each rank holds a slice of the heads.
        q, k, v = (proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2) for proj in (self.wq, self.wk, self.wv))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # keys and values of the earlier tokens too (k/v heads cached once each)
            k, v = cache.update(layer, k, v)
        if k.shape[1] != q.shape[1]:  # grouped-query: each kv head serves n_head / n_kv_head query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, dropout_p=dropout)
        return self.wo(y.transpose(1, 2).reshape(bsz, seq, -1))  # heads merged back: [B, T, n_head · hd]


class MLP(nn.Module):
    """GELU MLP (w1 → gelu → w2) or SwiGLU (silu(w1 x) · w3 x → w2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias) if self.gated else None
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.bias)

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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.resid_dropout(self.attention(self.attention_norm(x), rope, cache=cache, layer=layer))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


def initial_value(cfg: ModelConfig, name: str, shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial fp32 CPU value of parameter `name` (its single-process name) for run seed `seed`.

    Normal(0, init_std) for matrices and tables, zero biases, unit norm weights; residual outputs (attention.wo,
    mlp.w2) scaled by 1/sqrt(2·n_layer) so the residual stream's variance does not grow with depth (GPT-2). Each
    parameter has a generator of its own, seeded from (seed, name): any process can draw any one parameter alone,
    so a sharded build initializes shard by shard and still gets exactly these weights."""
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:  # norm weights
        return torch.ones(shape)
    std = cfg.init_std
    if name.endswith("attention.wo.weight") or name.endswith("mlp.w2.weight"):
        std = std / math.sqrt(2 * cfg.n_layer)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


class GPT(nn.Module):
    """tokens [B, T] → logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.norm = make_norm(cfg)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
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
    def init_weights(self, seed: int | None = None) -> None:
        """Draw every parameter from `seed` (see `initial_value`); None = a seed drawn from torch's global RNG, so
        `torch.manual_seed(s); GPT(cfg)` is reproducible. Parameters on the meta device are left alone: a model
        built there is initialized after it is materialized (scalelm.parallel.materialize)."""
        if seed is None:
            seed = int(torch.randint(2**62, (), device="cpu").item())
        for name, p in self.named_parameters():
            if not p.is_meta:
                p.copy_(initial_value(self.cfg, name, p.shape, seed))

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens [B, T] (or hidden states [B, T, d] on a later pipeline stage) → logits or hidden states.

        With a `cache` (generation), the tokens continue what the cache holds: their positions and mask come from
        it (`cache.prepare(T)` first), their keys and values go into it."""
        seq = tokens.shape[1]
        # Positions: 0..T-1 for every row, or per row from the cache ([B, T]: left-padded rows start later).
        positions = torch.arange(seq, device=tokens.device) if cache is None else cache.positions
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)
            if self.pos_embeddings is not None:
                h = h + self.pos_embeddings(positions)
            elif self.pos_table is not None:
                h = h + self.pos_table[positions].to(h.dtype)
            h = self.emb_dropout(h)
        else:
            h = tokens
        rope = None
        if self.rope_cos is not None:  # [T, hd/2], or with a cache [B, 1, T, hd] widened once for every layer
            rope = (self.rope_cos[:seq], self.rope_sin[:seq]) if cache is None else \
                widen_rope(self.rope_cos[positions][:, None], self.rope_sin[positions][:, None], h.dtype)
        for name, block in self.layers.items():
            h = block(h, rope, cache=cache, layer=int(name))
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
