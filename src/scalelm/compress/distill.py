"""Knowledge distillation (Hinton et al. 2015) through the normal trainer.

`DistillTrainer` overrides `Trainer.forward_loss` only: per token, alpha · T² · KL(teacher_T ‖ student_T) +
(1 − alpha) · cross-entropy with the data, where _T is the softmax at temperature T (T² keeps the soft term's
gradient scale independent of T). Both terms are sums over tokens divided by the step's global token count, as
the trainer's own loss, so micro-batches and data-parallel ranks add up to the single-process loss. The teacher
is frozen, in eval mode, on every rank; the rest (checkpoints, resume, metrics, DDP/FSDP layouts, evaluation on
the plain validation loss) is the trainer's. Tensor and pipeline parallelism split the student's logits, which
the KL term needs whole, so they are refused.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scalelm.config import Config
from scalelm.model.config import ModelConfig
from scalelm.model.counting import num_params
from scalelm.train.trainer import Trainer


class DistillError(ValueError):
    """A teacher/student pair or options that cannot be distilled, phrased for people."""


def check_pair(teacher: ModelConfig, student: ModelConfig, alpha: float, temperature: float,
               tp: int = 1, pp: int = 1) -> None:
    """Raise DistillError unless `student` can learn from `teacher` with these options and layout."""
    if teacher.vocab_size != student.vocab_size:
        raise DistillError(f"the student's vocabulary ({student.vocab_size}) differs from the teacher's "
                           f"({teacher.vocab_size}); set --model.vocab_size {teacher.vocab_size}")
    if num_params(student) > num_params(teacher):
        raise DistillError(f"the student ({num_params(student):,} parameters) is larger than the teacher "
                           f"({num_params(teacher):,}); choose a smaller student")
    if not 0.0 <= alpha <= 1.0:
        raise DistillError(f"--alpha {alpha} must be between 0 (data only) and 1 (teacher only)")
    if temperature <= 0:
        raise DistillError(f"--temperature {temperature} must be > 0")
    if tp > 1 or pp > 1:
        raise DistillError("distillation needs each rank's whole logits; tensor and pipeline parallelism split "
                           "them: use data parallelism (parallel.dp_shard / dp_replicate) only")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, alpha: float,
                 temperature: float, tokens_per_step: int) -> torch.Tensor:
    """alpha · T² · Σ_tokens KL(teacher_T ‖ student_T) / tokens + (1 − alpha) · Σ_tokens CE / tokens."""
    s = student_logits.float().flatten(0, 1)
    loss = (1.0 - alpha) * F.cross_entropy(s, targets.flatten(), reduction="sum") / tokens_per_step
    if alpha:
        t = teacher_logits.float().flatten(0, 1)
        kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                      reduction="sum")
        loss = loss + alpha * temperature**2 * kl / tokens_per_step
    return loss


class DistillTrainer(Trainer):
    """The trainer with the distillation loss; `teacher` is a loaded model (moved to this rank's device)."""

    def __init__(self, *args, teacher: nn.Module, alpha: float, temperature: float, **kwargs):
        super().__init__(*args, **kwargs)
        if self.pipeline is not None or (self.parallel is not None and self.parallel.tp_mesh is not None):
            raise DistillError("distillation needs whole logits: no tensor or pipeline parallelism")
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast(self.device):
            logits = self.model(x)
            if self.alpha:
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
            else:
                teacher_logits = logits
        return distill_loss(logits, teacher_logits, y, self.alpha, self.temperature, self.tokens_per_step)


def distill(cfg: Config, teacher_path: str | Path, alpha: float, temperature: float) -> dict[str, Any]:
    """Train the student `cfg` describes on the teacher's softened distribution; returns the end record."""
    from scalelm.infer.load import load_any_model
    from scalelm.train.run import train

    teacher = load_any_model(teacher_path)
    check_pair(teacher.cfg, cfg.model, alpha, temperature, cfg.parallel.tp, cfg.parallel.pp)
    return train(cfg, trainer_class=partial(DistillTrainer, teacher=teacher, alpha=alpha, temperature=temperature))
