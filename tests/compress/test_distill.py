"""The distillation loss: alpha = 0 is exactly the trainer's token loss, a student equal to its teacher adds no
KL, and the soft term is T² · KL of the tempered distributions summed over tokens."""

import pytest
import torch
import torch.nn.functional as F

from scalelm.compress.distill import DistillError, check_pair, distill_loss
from scalelm.model import get_preset
from scalelm.train.trainer import token_loss


def _logits():
    torch.manual_seed(0)
    return torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))


def test_alpha_zero_is_the_cross_entropy_of_the_trainer():
    student, teacher, targets = _logits()
    assert torch.equal(distill_loss(student, teacher, targets, 0.0, 2.0, 40), token_loss(student, targets, 40))


def test_the_soft_term_is_t_squared_kl_of_the_tempered_distributions():
    student, teacher, targets = _logits()
    t = 3.0
    p_teacher = F.softmax(teacher / t, -1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / t, -1))).sum()
    torch.testing.assert_close(distill_loss(student, teacher, targets, 1.0, t, 40), t * t * kl / 40)
    assert float(distill_loss(student, student, targets, 1.0, t, 40)) == pytest.approx(0.0, abs=1e-6)


def test_pairs_and_options_are_checked():
    teacher, small = get_preset("shakespeare-char"), get_preset("tiny")
    check_pair(teacher, small, 0.5, 2.0)
    with pytest.raises(DistillError, match="larger than the teacher"):
        check_pair(small, teacher, 0.5, 2.0)
    with pytest.raises(DistillError, match="tensor and pipeline"):
        check_pair(teacher, small, 0.5, 2.0, tp=2)
    with pytest.raises(DistillError, match="--alpha"):
        check_pair(teacher, small, 1.5, 2.0)
