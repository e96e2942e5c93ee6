"""Pruning masks for a built GPT's linear layers: magnitude or Wanda scores, unstructured or 2:4.

Scores: magnitude |W|; Wanda |W_ij| · ‖X_j‖₂ (Sun et al. 2023), with ‖X_j‖ the L2 norm of input channel j over
the tokens of a few calibration batches, gathered by forward hooks on the dense model in one pass (the paper
also prunes layer by layer in sequence; one pass keeps this a pure function of the dense model). Both compare
weights within each output row, as Wanda does, so the two methods differ only in their score.

Patterns: unstructured (the `sparsity` share of each row with the lowest scores is zeroed) and 2:4 (in every
run of 4 consecutive input weights of a row, the 2 lowest are zeroed: the semi-structured sparsity that sparse
tensor cores run). The token embedding and the output head are left dense, as in the Wanda and SparseGPT papers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

METHODS = ("magnitude", "wanda")


class PruneError(ValueError):
    """Pruning options the model does not allow, phrased for people."""


def prunable(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the Transformer blocks (not the head)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "output"]


def check_options(method: str, sparsity: float | None, pattern: str | None) -> None:
    if method not in METHODS:
        raise PruneError(f"--method {method!r} is not supported; choose magnitude or wanda")
    if (sparsity is None) == (pattern is None):
        raise PruneError("give exactly one of --sparsity S (unstructured, 0 <= S < 1) or --pattern 2:4")
    if pattern is not None and pattern != "2:4":
        raise PruneError(f"--pattern {pattern!r} is not supported; the semi-structured pattern is 2:4")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise PruneError(f"--sparsity {sparsity} must be at least 0 and below 1 (the share of weights zeroed)")


@torch.no_grad()
def input_norms(model: nn.Module, batches: Iterable[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ over all calibration tokens, per input channel j of each named linear layer (forward hooks)."""
    sums = {name: None for name in names}
    hooks = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            squares = (x * x).sum(0)
            sums[name] = squares if sums[name] is None else sums[name] + squares
        return hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name)))
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [n for n, s in sums.items() if s is None]
    if missing:
        raise PruneError(f"no calibration activations reached {missing[0]}")
    return {name: s.sqrt() for name, s in sums.items()}


def wanda_score(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂ for weight [out, in] and norm [in]."""
    return weight.detach().abs().float() * norm.float()[None, :]


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask (True = kept): in each row, the floor(sparsity · in) lowest scores are dropped."""
    drop = int(score.shape[1] * sparsity)
    mask = torch.ones_like(score, dtype=torch.bool)
    if drop:
        lowest = score.topk(drop, dim=1, largest=False).indices
        mask.scatter_(1, lowest, False)
    return mask


def two_four_mask(score: torch.Tensor) -> torch.Tensor:
    """Bool mask keeping the 2 highest scores in each run of 4 consecutive input weights of every row."""
    out_features, in_features = score.shape
    if in_features % 4:
        raise PruneError(f"2:4 needs input widths divisible by 4, a layer has {in_features}")
    groups = score.reshape(out_features, in_features // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_features, in_features)


@torch.no_grad()
def prune_masks(model: nn.Module, method: str, sparsity: float | None = None, pattern: str | None = None,
                calibration: Iterable[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{layer name: bool mask [out, in]} for the model's block linear layers; Wanda needs `calibration`
    batches of token ids."""
    check_options(method, sparsity, pattern)
    names = prunable(model)
    norms = None
    if method == "wanda":
        if calibration is None:
            raise PruneError("Wanda needs calibration batches")
        norms = input_norms(model, calibration, names)
    masks = {}
    for name in names:
        weight = model.get_submodule(name).weight
        score = wanda_score(weight, norms[name]) if norms else weight.detach().abs().float()
        masks[name] = two_four_mask(score) if pattern else unstructured_mask(score, sparsity)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked weights in place."""
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        weight.mul_(mask.to(weight.device, weight.dtype))


def sparsity_of(model: nn.Module, names: list[str]) -> float:
    """Share of exactly-zero weights over the named linear layers."""
    zeros = total = 0
    for name in names:
        w = model.get_submodule(name).weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


def is_two_four(weight: torch.Tensor) -> bool:
    """Whether every run of 4 consecutive input weights of every row has at least 2 zeros."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    return bool(((groups == 0).sum(-1) >= 2).all())
