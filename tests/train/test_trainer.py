import math
import shutil

import pytest
import torch
from helpers import losses, metrics, train

import scalelm
from scalelm.config import OptimConfig, build_config
from scalelm.train.checkpoint import checkpoint_dirs, state_sha256, unique_state
from scalelm.train.optim import lr_factor


def test_run_writes_metrics_and_end_line(tmp_path):
    assert train(tmp_path / "run", "--train.steps", "6", "--train.log_every", "2", "--train.eval_every", "3") == 0
    records = metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "mem_gib"):
        assert all(key in r for r in steps)
    assert all(0 < r["mfu"] < 1 for r in steps)  # CPU peak is measured, never guessed
    assert [r["step"] for r in records if "val_loss" in r and "event" not in r] == [3, 6]
    end = records[-1]
    assert end["event"] == "end" and end["step"] == 6 and math.isfinite(end["val_loss"])
    model = scalelm.load(tmp_path / "run")
    assert state_sha256(unique_state(model)) == end["params_sha256"]
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 128)


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    args = ("--train.steps", "12", "--train.log_every", "1", "--checkpoint.every", "6", "--train.eval_every", "0",
            "--model.dropout", "0.1")
    train(tmp_path / "full", *args)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    final = checkpoint_dirs(tmp_path / "resumed")[-1]
    assert final.name == "step_00000012"
    shutil.rmtree(final)  # as if the run had stopped after the step-6 checkpoint
    train(tmp_path / "resumed", *args)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")  # exact, dropout RNG included
    timing = ("measured_step_time_s", "step_time_drift_pct")  # wall-clock: differs between any two runs
    ends = [{k: v for k, v in metrics(run)[-1].items() if k not in timing} for run in (tmp_path / "resumed", tmp_path / "full")]
    assert ends[0] == ends[1] and ends[0]["event"] == "end"


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    train(tmp_path / "one", "--train.steps", "3", "--train.log_every", "1")
    train(tmp_path / "acc", "--train.steps", "3", "--train.log_every", "1", "--train.micro_batch", "2")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "acc")
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6)
    wa = unique_state(scalelm.load(tmp_path / "one"))
    wb = unique_state(scalelm.load(tmp_path / "acc"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-5)


def test_clip_scales_to_max_norm_and_reports_preclip_norm():
    from scalelm.train.trainer import Trainer

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0, 0.0])
    fake = Trainer.__new__(Trainer)
    fake.cfg = build_config({}, {"optim.grad_clip": "1.0"})
    fake.params = params
    norm = Trainer.clip_gradients(fake)
    assert norm.item() == pytest.approx(5.0)
    total = torch.cat([p.grad for p in params]).norm().item()
    assert total == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedules_warm_up_then_reach_their_floor(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    f = [lr_factor(cfg, s, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    if schedule == "constant":
        assert f[-1] == 1.0
    else:
        assert f[-1] == pytest.approx(0.1)
    if schedule == "wsd":
        assert f[79] == 1.0 and f[80] < 1.0


def test_muon_option_trains(tmp_path):
    assert train(tmp_path / "m", "--train.steps", "4", "--train.log_every", "2", "--optim.name", "muon") == 0
    assert losses(tmp_path / "m")[4] < losses(tmp_path / "m")[2] + 0.5


def test_fresh_run_in_finished_directory_restarts_cleanly(tmp_path):
    train(tmp_path / "r", "--train.steps", "2", "--train.log_every", "1")
    train(tmp_path / "r", "--train.steps", "2", "--train.log_every", "1", "--checkpoint.resume", "false")
    records = metrics(tmp_path / "r")
    assert sum(1 for r in records if r.get("event") == "end") == 1


def test_one_process_applies_activation_checkpointing(tmp_path, caplog):
    caplog.set_level("INFO", logger="scalelm.parallel")
    train(tmp_path / "plain", "--train.steps", "2", "--train.log_every", "1")
    train(tmp_path / "ac", "--train.steps", "2", "--train.log_every", "1", "--parallel.activation_checkpoint", "full")
    assert "applied full activation checkpointing to blocks 0, 1, 2, 3" in caplog.text
    assert losses(tmp_path / "ac") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)
