"""The Hugging Face layouts of the plain model: GPT-2 and Llama configs and weight names, both directions.

Plain functions on config dicts and state dicts (torch tensors, no `transformers` import), so a training run can
start from a Hugging Face directory on every rank without that library. Two families map exactly:
- GPT-2: learned positions, LayerNorm, tanh-GELU MLP, biases everywhere. HF stores its linear layers as Conv1D
  (weight [in, out], the transpose of nn.Linear's) and q/k/v fused in one `c_attn`.
- Llama: RoPE, RMSNorm, SwiGLU, grouped-query heads. scalelm's RoPE rotates halves (x[:d/2], x[d/2:]) with the
  same frequencies as HF's `rotate_half`, so q and k weights are copied as they are (the interleaved-pair
  permutation is only needed for Meta's original checkpoints).
Anything else is refused with a `FormatError` naming what differs.
"""

from __future__ import annotations

from typing import Any

import torch

from scalelm.model.config import ModelConfig


class FormatError(ValueError):
    """A model or checkpoint that has no exact counterpart in the other layout, phrased for people."""


FAMILIES = {"gpt2": dict(pos="learned", norm="layernorm", mlp="gelu"),
            "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu")}


def hf_family(cfg: ModelConfig) -> str:
    """"gpt2" or "llama", the HF family whose computation equals this model's; FormatError otherwise."""
    family = next((f for f, needs in FAMILIES.items() if all(getattr(cfg, k) == v for k, v in needs.items())), None)
    if family is None:
        raise FormatError(f"model has pos={cfg.pos}, norm={cfg.norm}, mlp={cfg.mlp}: Hugging Face GPT-2 needs "
                          f"learned positions, LayerNorm and GELU; Llama needs RoPE, RMSNorm and SwiGLU")
    if family == "gpt2":
        if not cfg.bias:
            raise FormatError("model.bias=false: Hugging Face GPT-2 has biases in every linear layer and LayerNorm")
        if cfg.kv_heads != cfg.n_head:
            raise FormatError(f"model.n_kv_head={cfg.kv_heads} < n_head={cfg.n_head}: Hugging Face GPT-2 has no "
                              f"grouped-query attention (use the Llama layout: RoPE, RMSNorm, SwiGLU)")
        if cfg.dim_head * cfg.n_head != cfg.d_model:
            raise FormatError(f"model.head_dim={cfg.dim_head} × n_head={cfg.n_head} != d_model={cfg.d_model}: "
                              f"Hugging Face GPT-2 derives the head width from d_model")
    return family


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of the transformers config class (GPT2Config / LlamaConfig) for this model; the family is
    `model_type`. No special tokens: scalelm's tokenizers have none."""
    family = hf_family(cfg)
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "gpt2":
        return dict(common, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=cfg.d_model,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.ffn_hidden, n_positions=cfg.max_seq_len,
                    activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout,
                    embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
    return dict(common, model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=cfg.d_model,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                head_dim=cfg.dim_head, intermediate_size=cfg.ffn_hidden, max_position_embeddings=cfg.max_seq_len,
                rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, hidden_act="silu", attention_bias=cfg.bias,
                mlp_bias=cfg.bias, attention_dropout=cfg.dropout)


def _require(hf: dict[str, Any], key: str, allowed: tuple, why: str) -> None:
    if hf.get(key, allowed[0]) not in allowed:
        raise FormatError(f"config.json has {key}={hf[key]!r}; scalelm supports {' or '.join(map(repr, allowed))} "
                          f"({why})")


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of an HF config.json (GPT-2 or Llama family); FormatError naming the first difference."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "the tanh approximation of GELU")
        _require(hf, "scale_attn_weights", (True,), "scores scaled by 1/sqrt(head_dim)")
        _require(hf, "scale_attn_by_inverse_layer_idx", (False,), "no per-layer score scaling")
        _require(hf, "add_cross_attention", (False,), "a decoder without cross-attention")
        d = hf["n_embd"]
        return ModelConfig(vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=d,
                           d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"], pos="learned",
                           norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", bias=True,
                           tie_embeddings=hf.get("tie_word_embeddings", True), dropout=hf.get("resid_pdrop", 0.0),
                           init_std=hf.get("initializer_range", 0.02))
    if kind == "llama":
        _require(hf, "hidden_act", ("silu",), "SwiGLU")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise FormatError(f"config.json has RoPE scaling {rope_type!r}; scalelm has plain RoPE only")
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            raise FormatError("config.json has attention_bias != mlp_bias; scalelm's model.bias covers both")
        heads = hf["num_attention_heads"]
        return ModelConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=heads,
                           n_kv_head=hf.get("num_key_value_heads") or heads, d_model=hf["hidden_size"],
                           head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, d_ff=hf["intermediate_size"],
                           max_seq_len=hf["max_position_embeddings"], pos="rope",
                           rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), norm="rmsnorm",
                           norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
                           bias=bool(hf.get("attention_bias", False)),
                           tie_embeddings=hf.get("tie_word_embeddings", False),
                           dropout=hf.get("attention_dropout", 0.0), init_std=hf.get("initializer_range", 0.02))
    raise FormatError(f"config.json has model_type={kind!r}; scalelm imports the gpt2 and llama families")


# ---- weights --------------------------------------------------------------------------------------------------
_LLAMA_BLOCK = {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj"}
_GPT2_BLOCK = {"attention_norm": "ln_1", "mlp_norm": "ln_2", "attention.wo": "attn.c_proj", "mlp.w1": "mlp.c_fc",
               "mlp.w2": "mlp.c_proj"}
_GPT2_CONV1D = ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def hf_module_name(cfg: ModelConfig, name: str) -> str:
    """HF module path of a scalelm block module ("layers.3.attention.wq"); GPT-2's q, k and v are all `c_attn`."""
    _, i, rest = name.split(".", 2)
    if hf_family(cfg) == "llama":
        return f"model.layers.{i}.{_LLAMA_BLOCK[rest]}"
    fused = rest in ("attention.wq", "attention.wk", "attention.wv")
    return f"transformer.h.{i}.{'attn.c_attn' if fused else _GPT2_BLOCK[rest]}"


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """scalelm state dict (tied head saved once or not at all) → HF names and layouts (tied head left out, as
    `save_pretrained` does)."""
    family = hf_family(cfg)
    out: dict[str, torch.Tensor] = {}
    if family == "llama":
        out["model.embed_tokens.weight"] = state["tok_embeddings.weight"]
        out["model.norm.weight"] = state["norm.weight"]
        for i in range(cfg.n_layer):
            for ours, theirs in _LLAMA_BLOCK.items():
                for kind in ("weight", "bias"):
                    if f"layers.{i}.{ours}.{kind}" in state:
                        out[f"model.layers.{i}.{theirs}.{kind}"] = state[f"layers.{i}.{ours}.{kind}"]
    else:
        out["transformer.wte.weight"] = state["tok_embeddings.weight"]
        out["transformer.wpe.weight"] = state["pos_embeddings.weight"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = state["norm.weight"], state["norm.bias"]
        for i in range(cfg.n_layer):
            p, h = f"layers.{i}.", f"transformer.h.{i}."
            for ours, theirs in _GPT2_BLOCK.items():
                w = state[p + ours + ".weight"]
                out[h + theirs + ".weight"] = w.t() if theirs in _GPT2_CONV1D else w
                out[h + theirs + ".bias"] = state[p + ours + ".bias"]
            qkv = [f"{p}attention.{n}" for n in ("wq", "wk", "wv")]
            out[h + "attn.c_attn.weight"] = torch.cat([state[n + ".weight"] for n in qkv]).t()
            out[h + "attn.c_attn.bias"] = torch.cat([state[n + ".bias"] for n in qkv])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict (GPT-2 or Llama, with or without the `transformer.`/`model.` prefix) → scalelm names;
    FormatError naming a missing tensor."""
    family = hf_family(cfg)
    prefix = "model." if family == "llama" else "transformer."
    tensors = {(k if k.startswith(prefix) or k == "lm_head.weight" else prefix + k): v for k, v in hf_state.items()}

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise FormatError(f"the checkpoint has no tensor {name!r}; is it a complete {family} model?")
        return tensors[name]

    out: dict[str, torch.Tensor] = {}
    if family == "llama":
        out["tok_embeddings.weight"], out["norm.weight"] = get("model.embed_tokens.weight"), get("model.norm.weight")
        kinds = ("weight", "bias") if cfg.bias else ("weight",)
        for i in range(cfg.n_layer):
            for ours, theirs in _LLAMA_BLOCK.items():
                for kind in kinds if ours not in ("attention_norm", "mlp_norm") else ("weight",):
                    out[f"layers.{i}.{ours}.{kind}"] = get(f"model.layers.{i}.{theirs}.{kind}")
    else:
        out["tok_embeddings.weight"], out["pos_embeddings.weight"] = get("transformer.wte.weight"), \
            get("transformer.wpe.weight")
        out["norm.weight"], out["norm.bias"] = get("transformer.ln_f.weight"), get("transformer.ln_f.bias")
        d = cfg.d_model
        for i in range(cfg.n_layer):
            p, h = f"layers.{i}.", f"transformer.h.{i}."
            for ours, theirs in _GPT2_BLOCK.items():
                w = get(h + theirs + ".weight")
                out[p + ours + ".weight"] = w.t() if theirs in _GPT2_CONV1D else w
                out[p + ours + ".bias"] = get(h + theirs + ".bias")
            w, b = get(h + "attn.c_attn.weight").t(), get(h + "attn.c_attn.bias")
            for j, n in enumerate(("wq", "wk", "wv")):
                rows = slice(j * d, (j + 1) * d)
                out[f"{p}attention.{n}.weight"], out[f"{p}attention.{n}.bias"] = w[rows], b[rows]
    if not cfg.tie_embeddings:
        out["output.weight"] = get("lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}
