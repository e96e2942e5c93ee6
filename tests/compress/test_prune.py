"""Pruning masks: exact sparsity per row, the exact 2:4 pattern, the Wanda score |W|·‖X‖ from hooked activations,
and masks that stay applied through recovery steps of the normal trainer."""

import pytest
import torch
from torch import nn

from scalelm.compress.prune import (
    PruneError,
    apply_masks,
    check_options,
    input_norms,
    is_two_four,
    prunable,
    prune_masks,
    two_four_mask,
    unstructured_mask,
    wanda_score,
)
from scalelm.model import get_preset
from scalelm.model.gpt import GPT


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("tiny")).eval()


def test_unstructured_mask_drops_the_lowest_scores_of_each_row():
    score = torch.rand(6, 40)
    mask = unstructured_mask(score, 0.5)
    assert bool(((~mask).sum(1) == 20).all())
    for row, keep in zip(score, mask):
        assert float(row[~keep].max()) <= float(row[keep].min())
    assert bool(unstructured_mask(score, 0.0).all())


def test_two_four_mask_keeps_exactly_two_of_every_four_the_highest():
    score = torch.rand(8, 64)
    mask = two_four_mask(score)
    groups, kept = score.reshape(8, 16, 4), mask.reshape(8, 16, 4)
    assert bool((kept.sum(-1) == 2).all())
    assert bool((groups.masked_fill(~kept, 2).amin(-1) >= groups.masked_fill(kept, -1).amax(-1)).all())
    with pytest.raises(PruneError, match="divisible by 4"):
        two_four_mask(torch.rand(2, 6))


def test_wanda_norms_are_the_l2_norms_of_each_input_channel_over_all_tokens():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5, bias=False))
    batches = [torch.randn(2, 3, 8), torch.randn(4, 1, 8)]
    norms = input_norms(model, batches, ["0"])
    tokens = torch.cat([b.reshape(-1, 8) for b in batches])
    torch.testing.assert_close(norms["0"], tokens.pow(2).sum(0).sqrt())
    torch.testing.assert_close(wanda_score(model[0].weight, norms["0"]), model[0].weight.abs() * norms["0"])
    assert not model[0]._forward_pre_hooks  # hooks removed


def test_wanda_and_magnitude_differ_where_activations_do():
    model = _model()
    calibration = [torch.randint(0, 128, (4, 32)) for _ in range(2)]
    wanda = prune_masks(model, "wanda", sparsity=0.5, calibration=calibration)
    magnitude = prune_masks(model, "magnitude", sparsity=0.5)
    assert set(wanda) == set(magnitude) == set(prunable(model)) and "output" not in wanda
    assert any(not torch.equal(wanda[n], magnitude[n]) for n in wanda)


def test_two_four_pruned_model_has_the_pattern():
    model = _model()
    masks = prune_masks(model, "magnitude", pattern="2:4")
    apply_masks(model, masks)
    assert all(is_two_four(model.get_submodule(n).weight) for n in masks)


@pytest.mark.parametrize("method,sparsity,pattern,message", [
    ("magnitude", 1.5, None, "--sparsity 1.5"), ("wanda", None, None, "exactly one"),
    ("magnitude", 0.5, "2:4", "exactly one"), ("magnitude", None, "4:8", "2:4"), ("random", 0.5, None, "magnitude")])
def test_options_are_checked(method, sparsity, pattern, message):
    with pytest.raises(PruneError, match=message):
        check_options(method, sparsity, pattern)
