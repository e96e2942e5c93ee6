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
    timing = ("measured_step_time_s", "step_time_drift_pct", "train_wall_s")  # wall-clock: differs between runs
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


@pytest.mark.parametrize(("bf16_gflops", "fp32_gflops", "chosen"), [(440.0, 190.0, "bf16"), (130.0, 260.0, "fp32")])
def test_auto_precision_on_cpu_takes_the_faster_measured_matmul(monkeypatch, bf16_gflops, fp32_gflops, chosen):
    import scalelm.train.precision as precision

    rates = {"bf16": bf16_gflops * 1e9, "fp32": fp32_gflops * 1e9}
    monkeypatch.setattr(precision, "_has_cpu_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_peak_flops", lambda dtype: rates[dtype])
    assert precision.resolve_precision("auto", torch.device("cpu")).name == chosen
    monkeypatch.setattr(precision, "_has_cpu_bf16", lambda: False)
    assert precision.resolve_precision("auto", torch.device("cpu")).name == "fp32"


def test_config_records_the_precision_auto_chose(tmp_path, monkeypatch):
    import scalelm.train.precision as precision

    monkeypatch.setattr(precision, "_has_cpu_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_peak_flops", lambda dtype: {"bf16": 2.0, "fp32": 1.0}[dtype])
    assert train(tmp_path, "--train.dtype", "auto", "--train.steps", "1") == 0
    assert 'dtype = "bf16"' in (tmp_path / "config.toml").read_text()


def test_time_budget_counts_steps_evaluations_and_margin():
    from scalelm.train import budget

    assert budget.evaluations_in(12, 225, 100) == 3  # steps 100 and 200, and the end
    assert budget.evaluations_in(12, 200, 100) == 2  # step 200 is the end: one evaluation, not two
    assert budget.evaluations_in(12, 50, 0) == 1
    # 100.5 s left after the margin, 10 steps done, 1 s per step, a 20 s evaluation every 20 steps: 50 steps
    # (40 more + evaluations at 20, 40 and the end = 100 s) fit; 51 (41 + 60) would not
    assert budget.steps_within(100.5 / (1 - budget.MARGIN), 0.0, 10, 1.0, 20.0, 20, 1000) == 50
    assert budget.steps_within(1e9, 0.0, 10, 1.0, 1.0, 0, 225) == 225  # train.steps stays the limit
    assert budget.steps_within(1.0, 5.0, 12, 1.0, 1.0, 0, 225) == 12  # over budget already: stop now
    def brute(budget_s, elapsed, done, step_s, eval_s, every, most):  # the definition, step count by step count
        left = budget_s * (1 - budget.MARGIN) - elapsed
        ok = [n for n in range(done + 1, most + 1) if (n - done) * step_s
              + (sum(1 for k in range(done + 1, n) if every and k % every == 0) + 1) * eval_s <= left]
        return max(ok, default=done)

    for case in [(300.0, 20.0, 12, 0.7, 5.0, 100, 450), (300.0, 20.0, 12, 0.7, 5.0, 7, 450),
                 (90.0, 5.0, 40, 1.3, 9.0, 0, 60), (60.0, 70.0, 12, 0.5, 1.0, 10, 450)]:
        assert budget.steps_within(*case) == brute(*case)
    # eval cost: forward share of the validation tokens plus the sample's growing context, in step-time units
    assert budget.eval_seconds(2.0, 1000, 500, 3, 2) == pytest.approx(budget.FORWARD_SHARE * (500 + 1 + 2 + 2) * 2.0 / 1000)


def test_time_budget_stops_a_run_that_is_out_of_time(tmp_path):
    from scalelm.train.budget import PROBE_STEPS

    args = ("--train.steps", "40", "--train.eval_every", "0", "--train.time_budget_min", "0.0001")
    assert train(tmp_path, *args) == 0
    records = metrics(tmp_path)
    fixed = [r for r in records if r.get("event") == "time_budget"]
    assert [(r["step"], r["steps"]) for r in fixed] == [(PROBE_STEPS, PROBE_STEPS)]  # no time left: stop now
    assert records[-1]["event"] == "end" and records[-1]["step"] == PROBE_STEPS


def test_time_budget_length_is_kept_on_resume(tmp_path, monkeypatch):
    from scalelm.train import budget

    monkeypatch.setattr(budget, "steps_within", lambda *args: 20)  # the timing-free stand-in for a fit length
    args = ("--train.steps", "40", "--train.log_every", "1", "--checkpoint.every", "6", "--train.eval_every", "0",
            "--train.time_budget_min", "5")
    assert train(tmp_path / "full", *args) == 0
    assert metrics(tmp_path / "full")[-1]["step"] == 20
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(checkpoint_dirs(tmp_path / "resumed")[-1])  # stopped after the step-18 checkpoint
    monkeypatch.setattr(budget, "steps_within", lambda *args: 40)  # a resumed run does not plan again
    assert train(tmp_path / "resumed", *args) == 0
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")  # same length, so the same LR schedule


def test_val_loss_does_not_depend_on_the_training_batch(tmp_path):
    """The same validation windows (32 per evaluation batch) for every training batch from 32 up; a smaller
    training batch evaluates batches of its own size (the end of a run sized like its middle)."""
    frozen = ("--train.steps", "1", "--optim.lr", "1e-12", "--optim.warmup_steps", "0", "--train.eval_batches", "2")
    ends = []
    for batch in ("32", "48"):
        assert train(tmp_path / batch, *frozen, "--train.global_batch", batch) == 0
        ends.append(metrics(tmp_path / batch)[-1]["val_loss"])
    assert ends[0] == pytest.approx(ends[1], rel=1e-6)
