"""LoRA (Hu et al. 2021) applied to a built plain model from outside: `apply_lora(model, rank, alpha, targets)`.

Each target linear layer's weight becomes W + (alpha / rank) · B A through `torch.nn.utils.parametrize`: W is
frozen, A [rank, in] and B [out, rank] train, and B starts at zero so the adapted model starts equal to the base.
Because the layer still exposes one `.weight`, every consumer of the weights (the CPU attention kernel's fused
q/k/v matmul, oneDNN linears, generation) computes the adapted model unchanged; `merge_lora` folds B A into W
(parametrize's own `leave_parametrized`) and gives back the plain model. Every other parameter is frozen too.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from scalelm.config import ConfigError

TARGETS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
           "w1": "mlp.w1", "w2": "mlp.w2", "w3": "mlp.w3"}
"""Short names of the block's linear layers (`--lora.targets q,v`); `all-linear` = all of them (not the head)."""


class LoRADelta(nn.Module):
    """The parametrization W ↦ W + scale · B A (A: Kaiming-uniform as nn.Linear, B: zeros)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, device=None):
        super().__init__()
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scale * (self.lora_B @ self.lora_A)).to(weight.dtype)


def parse_targets(targets: str) -> list[str]:
    """`q,v` / `all-linear` → block module suffixes; ConfigError naming the unknown one."""
    if targets.strip() == "all-linear":
        return list(TARGETS.values())
    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ConfigError(f"lora.targets={targets!r}: use a comma list of {', '.join(TARGETS)} or all-linear")
    return [TARGETS[t] for t in names]


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str) -> list[str]:
    """Freeze `model` and add rank-`rank` adapters to its `targets` linear layers, in place; returns the adapted
    module names (e.g. "layers.0.attention.wq")."""
    if rank < 1:
        raise ConfigError(f"lora.rank={rank} must be >= 1")
    suffixes = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("layers.") and name.split(".", 2)[2] in suffixes:
            out_features, in_features = module.weight.shape
            delta = LoRADelta(out_features, in_features, rank, alpha, device=module.weight.device)
            parametrize.register_parametrization(module, "weight", delta)
            adapted.append(name)
    if not adapted:
        raise ConfigError(f"lora.targets={targets!r} matched no layer of this model; the MLP of a GELU model has "
                          f"w1 and w2 only")
    return adapted


def lora_modules(model: nn.Module) -> dict[str, LoRADelta]:
    """Adapted module name → its LoRADelta."""
    out = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, LoRADelta):
                    out[name] = p
    return out


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: {"layers.0.attention.wq.lora_A": A, ...lora_B: B}, detached on CPU."""
    state = {}
    for name, delta in lora_modules(model).items():
        state[f"{name}.lora_A"] = delta.lora_A.detach().cpu().contiguous()
        state[f"{name}.lora_B"] = delta.lora_B.detach().cpu().contiguous()
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapters into a model that `apply_lora` adapted the same way."""
    modules = lora_modules(model)
    names = {f"{n}.{part}" for n in modules for part in ("lora_A", "lora_B")}
    if names != set(state):
        raise ValueError(f"the adapters do not fit this model: {sorted(names ^ set(state))[:3]} differ")
    with torch.no_grad():
        for name, delta in modules.items():
            delta.lora_A.copy_(state[f"{name}.lora_A"])
            delta.lora_B.copy_(state[f"{name}.lora_B"])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W ← W + scale · B A) and remove the parametrizations, in place: the
    plain model again, with the state dict names of the base."""
    for name in lora_modules(model):
        module = model.get_submodule(name)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model
