"""LoRA adapters of a scalelm run in the `peft` format (adapter_config.json + adapter_model.safetensors), for the
Hugging Face export of their base model: `PeftModel.from_pretrained(model, HF_DIR/adapter)`.

Llama's projections map one to one. GPT-2 fuses q, k and v into one `c_attn`: adapters on n of them become one
adapter of rank n·r on c_attn, A stacked and B block-diagonal (q's rows fed by q's A only, ...), with alpha·n so
the scale alpha/r is unchanged; the product B A is then exactly the stacked q/k/v deltas.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from scalelm.model.config import ModelConfig
from scalelm.model.hf_layout import hf_family, hf_module_name

QKV = ("attention.wq", "attention.wk", "attention.wv")


def peft_tensors(adapters: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module path → (A, B) from scalelm adapters {"layers.0.attention.wq.lora_A": ..., ...}."""
    modules = sorted({k.rsplit(".", 1)[0] for k in adapters})
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    fused: dict[str, list[tuple[int, str]]] = {}
    for name in modules:
        a, b = adapters[f"{name}.lora_A"], adapters[f"{name}.lora_B"]
        rest = name.split(".", 2)[2]
        if hf_family(cfg) == "gpt2" and rest in QKV:
            fused.setdefault(hf_module_name(cfg, name), []).append((QKV.index(rest), name))
        else:
            out[hf_module_name(cfg, name)] = (a, b)
    d = cfg.d_model
    for target, parts in fused.items():
        parts.sort()
        a = torch.cat([adapters[f"{name}.lora_A"] for _, name in parts])
        rank = adapters[f"{parts[0][1]}.lora_A"].shape[0]
        b = torch.zeros(3 * d, rank * len(parts), dtype=a.dtype)
        for j, (which, name) in enumerate(parts):
            b[which * d:(which + 1) * d, j * rank:(j + 1) * rank] = adapters[f"{name}.lora_B"]
        out[target] = (a, b)
    return out


def save_peft_adapter(directory: Path, adapters: dict[str, torch.Tensor], info: dict, cfg: ModelConfig,
                      base_path: Path) -> None:
    """adapter_config.json (written by peft's LoraConfig) + adapter_model.safetensors in `directory`."""
    from peft import LoraConfig

    pairs = peft_tensors(adapters, cfg)
    rank, alpha = info["rank"], info["alpha"]
    targets = sorted({path.split(".", 3)[3] for path in pairs})  # "self_attn.q_proj", "attn.c_attn", ...
    rank_pattern, alpha_pattern = {}, {}
    for path, (a, _) in pairs.items():
        if a.shape[0] != rank:  # GPT-2's fused c_attn: rank n·r, alpha n·alpha
            suffix = path.split(".", 3)[3]
            rank_pattern[suffix], alpha_pattern[suffix] = a.shape[0], alpha * a.shape[0] / rank
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        fan_in_fan_out=hf_family(cfg) == "gpt2", base_model_name_or_path=str(base_path))
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {}
    for path, (a, b) in pairs.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
