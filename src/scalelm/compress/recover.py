"""Recovery fine-tuning of a pruned model through the normal trainer, with its masks kept.

`recover(cfg, state, masks)` runs `scalelm.train.run.train`: `prepare_model` loads the pruned weights into the
freshly built model, and `MaskedTrainer` zeroes the pruned weights again after every optimizer step. Re-applying
the masks to the weights (rather than masking gradients, or a parametrization) is what keeps them exact: weight
decay, AdamW's momentum and Muon's orthogonalized update all move a weight whose gradient is zero, and a
parametrization would rename the weights in the checkpoints (`...parametrizations.weight.original`), which every
loader would then have to know about. Checkpoints, resume and metrics are the trainer's own.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from scalelm.config import Config
from scalelm.train.trainer import Trainer


class MaskedTrainer(Trainer):
    """The trainer with `masks` ({linear layer name: bool [out, in], True = kept}) re-applied to the weights
    after every optimizer step. One process only: the weights must be the plain tensors the masks index."""

    def __init__(self, *args, masks: dict[str, torch.Tensor], **kwargs):
        super().__init__(*args, **kwargs)
        if self.parallel is not None:
            raise ValueError("recovery fine-tuning with masks runs in one process")
        self.masked = [(self.model.get_submodule(name).weight, mask.to(self.device))
                       for name, mask in masks.items()]
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for weight, mask in self.masked:
            weight.mul_(mask.to(weight.dtype))

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        result = super().train_step()
        self.apply_masks()
        return result


def load_state(state: dict[str, torch.Tensor]):
    """A prepare_model hook that loads `state` (the pruned weights) into the built model."""
    def prepare(model: nn.Module, cfg: Config) -> None:
        tied = {"output.weight"} if model.cfg.tie_embeddings else set()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) - tied or unexpected:
            raise ValueError(f"pruned weights do not fit the model (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]})")
    return prepare


def recover(cfg: Config, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Fine-tune the pruned weights `state` per `cfg` (its out directory, steps, optimizer) with `masks` kept;
    returns the trainer's end record."""
    from scalelm.train.run import train

    return train(cfg, prepare_model=load_state(state), trainer_class=partial(MaskedTrainer, masks=masks))
