"""ModelConfig: the shape of a decoder-only Transformer, with no torch import.

The cluster model (`scalelm.perf`) and the CLI read these dataclasses to count parameters and FLOPs,
so this module must stay importable on a machine without PyTorch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

PositionKind = Literal["learned", "sinusoidal", "rope"]
NormKind = Literal["layernorm", "rmsnorm"]
MlpKind = Literal["gelu", "swiglu"]


@dataclass
class ModelConfig:
    """Shape and options of the Transformer. Presets live in `scalelm.model.presets`."""

    preset: str | None = None
    """Name of the preset this config started from (informational; overrides already applied)."""
    vocab_size: int = 128
    """Rows of the token embedding. Must be >= the tokenizer's vocabulary; padding to a multiple of 64 keeps matmuls aligned."""
    n_layer: int = 4
    """Number of Transformer blocks."""
    n_head: int = 4
    """Attention (query) heads."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention; None = n_head (multi-head attention)."""
    d_model: int = 256
    """Width of the residual stream."""
    head_dim: int | None = None
    """Width of one head; None = d_model // n_head (GPT-3 XL and 13B state other values)."""
    d_ff: int | None = None
    """Hidden width of the MLP; None = 4·d_model for GELU, the Llama rule (2/3 · 4d rounded up to 256) for SwiGLU."""
    max_seq_len: int = 256
    """Longest context the model is built for (size of learned/sinusoidal/RoPE tables)."""
    pos: PositionKind = "rope"
    """Position encoding: learned table, fixed sinusoidal table, or rotary (RoPE) on q and k."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm: NormKind = "rmsnorm"
    """Normalization in the pre-norm blocks."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    mlp: MlpKind = "swiglu"
    """MLP kind: GELU (two matrices) or SwiGLU (three matrices, gated)."""
    bias: bool = False
    """Biases in linear layers and LayerNorm."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    dropout: float = 0.0
    """Dropout on attention probabilities, residual branches and embeddings."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections use init_std / sqrt(2·n_layer) (GPT-2)."""

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head

    @property
    def ffn_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        hidden = int(2 * 4 * self.d_model / 3)
        return 256 * ((hidden + 255) // 256)

    def validate(self) -> None:
        """Raise ValueError with a message that names the field and the fix."""
        positive = ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be > 0")
        for name in ("n_kv_head", "head_dim", "d_ff"):  # optional: unset derives them from the others
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be > 0 (or unset)")
        if self.head_dim is None and self.d_model % self.n_head:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and h <= 64]
            raise ValueError(
                f"model.n_head={self.n_head} does not divide model.d_model={self.d_model}; "
                f"use one of {divisors[-6:]} or set model.head_dim"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"model.n_kv_head={self.kv_heads} must divide model.n_head={self.n_head} (grouped-query attention)"
            )
        if self.pos == "rope" and self.dim_head % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {self.dim_head}; change model.head_dim")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        for name, allowed in (("pos", PositionKind), ("norm", NormKind), ("mlp", MlpKind)):
            choices = allowed.__args__  # type: ignore[attr-defined]
            if getattr(self, name) not in choices:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
