"""The commands end to end on a tiny run: a quantized checkpoint loads with scalelm.load, generates and
evaluates and is smaller on disk; pruning with recovery keeps its masks through the trainer's steps; distillation
trains through the normal trainer; wrong options are one line and exit code 2."""

import json

import pytest
import torch
from helpers import train
from safetensors.torch import load_file

import scalelm
from scalelm.cli import main
from scalelm.compress.prune import is_two_four


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "run"
    assert train(out, "--train.steps", "3") == 0
    return out


def _one_line_error(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err


@pytest.mark.parametrize("bits,extra,ratio", [(8, [], 3.0), (4, ["--group-size", "32"], 4.5)])
def test_quantized_checkpoint_loads_generates_evaluates_and_is_smaller(run, tmp_path, capsys, bits, extra, ratio):
    out = tmp_path / f"int{bits}"
    assert main(["quantize", str(run), "--bits", str(bits), *extra, "--out", str(out)]) == 0
    dense_file = next((run / "checkpoints").iterdir()) / "model.safetensors"
    assert dense_file.stat().st_size / (out / "model.safetensors").stat().st_size > ratio
    model, dense = scalelm.load(out), scalelm.load(run)
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        assert (model(ids) - dense(ids)).abs().max() < 0.1 * dense(ids).abs().max()
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "ab", "--max-new-tokens", "5", "--greedy"]) == 0
    assert main(["eval", str(out), "--json"]) == 0
    quantized_loss = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"]
    assert main(["eval", str(run), "--json"]) == 0
    dense_loss = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"]
    assert abs(quantized_loss - dense_loss) < 0.05 * dense_loss


def test_pruning_with_recovery_keeps_the_two_four_masks(run, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(run), "--method", "wanda", "--pattern", "2:4", "--calibration-batches", "1",
                 "--recover-steps", "3", "--out", str(out)]) == 0
    assert "masks kept" in capsys.readouterr().out
    masks = load_file(str(out / "masks.safetensors"))
    before, after = scalelm.load(run), scalelm.load(out)
    for name, mask in masks.items():
        weight = after.get_submodule(name).weight
        assert bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())
        assert bool((weight[~mask] == 0).all()) and is_two_four(weight)
        assert not torch.equal(weight[mask], before.get_submodule(name).weight[mask])  # the steps trained them
    assert json.loads((out / "prune.json").read_text())["method"] == "wanda"


def test_distillation_trains_a_smaller_student(run, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(run), "--student", "tiny", "--model.d_model", "16", "--out", str(out),
                 "--train.steps", "2", "--train.global_batch", "4", "--train.seq_len", "16", "--train.dtype", "fp32",
                 "--train.sample_tokens", "0", "--train.eval_every", "0", "--metrics.progress", "false"]) == 0
    assert "done: step 2" in capsys.readouterr().out
    assert scalelm.load(out).cfg.d_model == 16


def test_bad_options_are_one_line_and_exit_2(run, tmp_path, capsys):
    _one_line_error(capsys, ["quantize", str(run), "--bits", "3", "--out", str(tmp_path / "q")], "--bits 3")
    _one_line_error(capsys, ["prune", str(run), "--method", "magnitude", "--sparsity", "1.5", "--out",
                             str(tmp_path / "p")], "--sparsity 1.5")
    _one_line_error(capsys, ["distill", "--teacher", str(run), "--student", "shakespeare-char", "--out",
                             str(tmp_path / "d")], "larger than the teacher")
    _one_line_error(capsys, ["distill", "--teacher", str(run), "--student", "tiny", "--model.vocab_size", "64",
                             "--out", str(tmp_path / "d")], "vocabulary")
    assert not (tmp_path / "q").exists() and not (tmp_path / "p").exists() and not (tmp_path / "d").exists()
