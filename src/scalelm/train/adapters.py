"""Checkpoints of a LoRA run hold the adapters alone: the frozen base is the run's init_from, named once in
RUN/adapter.json.

`AdapterView` presents a LoRA model's adapters as a module whose state dict is theirs alone, so the ordinary
checkpoint functions (atomic writes, manifests, pruning, resume) save and restore them unchanged, and
`adapter_trainer` makes a trainer class save through it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from scalelm.config import Config
from scalelm.train.lora import adapter_state, load_adapter_state

ADAPTER_FILE = "adapter.json"


class AdapterView(nn.Module):
    """The adapters of `model` (adapted by apply_lora) as a module of their own, for save/load_checkpoint."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: the view's state is the adapters alone
        self.cfg = model.cfg

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return adapter_state(self.model)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):
        load_adapter_state(self.model, dict(state_dict))
        return _IncompatibleKeys([], [])


def adapter_trainer(base: Callable[..., Any]) -> Callable[..., Any]:
    """A subclass of the trainer class `base` whose checkpoints hold the adapters alone."""

    class AdapterTrainer(base):  # type: ignore[misc, valid-type]
        def save(self) -> None:
            model, self.model = self.model, AdapterView(self.model)
            try:
                super().save()
            finally:
                self.model = model

    return AdapterTrainer


def write_adapter_info(cfg: Config, modules: list[str]) -> None:
    """RUN/adapter.json: the base weights (init_from, absolute), rank, alpha, targets and adapted modules."""
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"base": str(Path(cfg.init_from).resolve()), "rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
            "targets": cfg.lora.targets, "modules": modules}
    (run_dir / ADAPTER_FILE).write_text(json.dumps(info, indent=1) + "\n")


def adapter_info(checkpoint: Path) -> dict[str, Any] | None:
    """adapter.json of the run a checkpoint (RUN/checkpoints/step_N) or run directory belongs to; None if the run
    trained the whole model."""
    for candidate in (checkpoint / ADAPTER_FILE, checkpoint.parent.parent / ADAPTER_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None
