"""Named model shapes. Torch-free, so the planner can read them.

Sources: GPT-2 (Radford et al. 2019, released configs), GPT-3 (Brown et al. 2020, Table 2.1), Llama 3
(Llama team 2024, Table 3). Table 2.1 is not self-consistent in two rows: XL lists 24 heads × 128 = 3072 ≠
d_model 2048, and 13B lists d_model 5140 ≠ 40 × 128. We keep d_head = 128 and the stated parameter counts
(1.3B, 13B): XL uses 16 heads of 128, 13B uses d_model 5120, as Megatron-LM and most reproductions do.
"""

from __future__ import annotations

from dataclasses import replace

from scalelm.model.config import ModelConfig

_GPT2 = dict(vocab_size=50257, max_seq_len=1024, pos="learned", norm="layernorm", mlp="gelu", bias=True,
             tie_embeddings=True, dropout=0.0)
_GPT3 = dict(_GPT2, max_seq_len=2048)
_LLAMA3 = dict(vocab_size=128256, max_seq_len=8192, pos="rope", rope_theta=500000.0, norm="rmsnorm",
               mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=8)

PRESETS: dict[str, ModelConfig] = {
    # Unit tests and multi-process parity checks: ~40k parameters; heads, kv heads and vocab divide by 2 and 4.
    "tiny": ModelConfig(vocab_size=128, n_layer=4, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=64),
    # The default run: Shakespeare, character level, sized for 5 minutes on a 2-core CPU (docs/benchmarks.md#make-demo).
    "shakespeare-char": ModelConfig(vocab_size=128, n_layer=4, n_head=4, d_model=256, max_seq_len=256),
    "gpt2-124m": ModelConfig(n_layer=12, n_head=12, d_model=768, **_GPT2),
    "gpt2-355m": ModelConfig(n_layer=24, n_head=16, d_model=1024, **_GPT2),
    "gpt2-774m": ModelConfig(n_layer=36, n_head=20, d_model=1280, **_GPT2),
    "gpt2-1.5b": ModelConfig(n_layer=48, n_head=25, d_model=1600, **_GPT2),
    "gpt3-125m": ModelConfig(n_layer=12, n_head=12, d_model=768, head_dim=64, **_GPT3),
    "gpt3-350m": ModelConfig(n_layer=24, n_head=16, d_model=1024, head_dim=64, **_GPT3),
    "gpt3-760m": ModelConfig(n_layer=24, n_head=16, d_model=1536, head_dim=96, **_GPT3),
    "gpt3-1.3b": ModelConfig(n_layer=24, n_head=16, d_model=2048, head_dim=128, **_GPT3),
    "gpt3-2.7b": ModelConfig(n_layer=32, n_head=32, d_model=2560, head_dim=80, **_GPT3),
    "gpt3-6.7b": ModelConfig(n_layer=32, n_head=32, d_model=4096, head_dim=128, **_GPT3),
    "gpt3-13b": ModelConfig(n_layer=40, n_head=40, d_model=5120, head_dim=128, **_GPT3),
    "gpt3-175b": ModelConfig(n_layer=96, n_head=96, d_model=12288, head_dim=128, **_GPT3),
    "llama3-8b": ModelConfig(n_layer=32, n_head=32, d_model=4096, d_ff=14336, **_LLAMA3),
    "llama3-70b": ModelConfig(n_layer=80, n_head=64, d_model=8192, d_ff=28672, **_LLAMA3),
    "llama3-405b": ModelConfig(n_layer=126, n_head=128, d_model=16384, d_ff=53248, **_LLAMA3),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a preset; unknown names raise KeyError listing the valid ones."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise KeyError(f"unknown model preset {name!r}; {hint}choose one of: {', '.join(PRESETS)}")
    return replace(PRESETS[name], preset=name)
