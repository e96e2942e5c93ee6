"""The numeric guard: a step with a non-finite loss or gradient norm is skipped (parameters, optimizer states and
schedule position unchanged, the batch consumed), logged and counted; one more than train.max_nonfinite_steps in a
row stops the run with one line, its last checkpoint intact. NaN comes from the test hook (train/guard.py)."""

import pytest
import torch
from helpers import TINY, metrics, train

import scalelm
from scalelm.config import build_config, parse_overrides
from scalelm.train import durable
from scalelm.train.checkpoint import latest_checkpoint, unique_state
from scalelm.train.guard import NAN_ENV
from scalelm.train.run import train as train_cfg
from scalelm.train.trainer import Trainer

ARGS = ("--train.log_every", "1", "--train.eval_batches", "1", "--cpu.matmul", "blas")


class Recorder(Trainer):
    """Snapshots everything a skipped step must leave alone, before and after each step."""

    steps: list[tuple[dict, dict]] = []

    def snapshot(self) -> dict:
        return {"params": {k: v.clone() for k, v in unique_state(self.model).items()},
                "optim": [{k: {n: t.clone() if torch.is_tensor(t) else t for n, t in s.items()}
                           for k, s in opt.state.items()} for opt in self.optimizers],
                "lr": [g["lr"] for opt in self.optimizers for g in opt.param_groups],
                "step": self.step, "batch": self.loader.step}

    def train_step(self):
        before = self.snapshot()
        out = super().train_step()
        Recorder.steps.append((before, self.snapshot()))
        return out


def _same(a: dict, b: dict) -> bool:
    if a["params"].keys() != b["params"].keys() or len(a["optim"]) != len(b["optim"]):
        return False
    params = all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    optim = all(sa.keys() == sb.keys() and all(
        all(torch.equal(x[n], y[n]) if torch.is_tensor(x[n]) else x[n] == y[n] for n in x) for x, y in
        ((sa[k], sb[k]) for k in sa)) for sa, sb in zip(a["optim"], b["optim"]))
    return params and optim and a["lr"] == b["lr"]


def test_nonfinite_steps_are_skipped_logged_and_counted(tmp_path, monkeypatch):
    monkeypatch.setenv(NAN_ENV, "3,4")
    Recorder.steps = []
    argv = [*TINY, *ARGS, "--train.steps", "5", "--train.max_nonfinite_steps", "2", "--out", str(tmp_path / "run")]
    end = train_cfg(build_config({}, parse_overrides(argv)), trainer_class=Recorder)
    assert end["step"] == 5
    assert [(b["step"], b["batch"], a["step"], a["batch"]) for b, a in Recorder.steps] == [
        (0, 0, 1, 1), (1, 1, 2, 2), (2, 2, 2, 3), (2, 3, 2, 4), (2, 4, 3, 5), (3, 5, 4, 6), (4, 6, 5, 7)]
    for before, after in Recorder.steps[2:4]:  # the two poisoned batches: nothing changed but the batch count
        assert _same(before, after)
    assert not _same(*Recorder.steps[4])  # the next batch trains
    records = metrics(tmp_path / "run")
    events = [r for r in records if r.get("event") == "nonfinite"]
    assert [(r["step"], r["batch"], r["skipped_total"]) for r in events] == [(3, 3, 1), (3, 4, 2)]
    assert [r["step"] for r in records if "loss" in r and "event" not in r] == [1, 2, 3, 4, 5]  # each step once
    state = (latest_checkpoint(tmp_path / "run") / "state.json").read_text()
    assert '"nonfinite_steps": 2' in state and '"step": 7' in state  # the loader consumed 7 batches


def test_too_many_in_a_row_stop_the_run_and_the_last_checkpoint_loads(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setenv(NAN_ENV, "5,6,7")
    args = (*ARGS, "--train.steps", "8", "--checkpoint.every", "2", "--train.max_nonfinite_steps", "2")
    assert train(run, *args) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "error: 3 steps in a row (from step 5) had a non-finite loss or gradient norm, more than "
        "train.max_nonfinite_steps=2; the last checkpoint is intact: lower optim.lr or raise optim.warmup_steps, "
        "then run the same command to resume")
    assert "Traceback" not in err
    last = latest_checkpoint(run)
    assert last.name == "step_00000004" and durable.check(last) is None
    assert scalelm.load(run) is not None
    monkeypatch.delenv(NAN_ENV)
    assert train(run, *args) == 0  # the same command resumes from step 4 once the data is good
    assert [r["step"] for r in metrics(run) if "loss" in r and "event" not in r] == list(range(1, 9))


def test_the_test_hook_refuses_a_malformed_list(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(NAN_ENV, "3,x")
    assert train(tmp_path / "run", *ARGS, "--train.steps", "2") == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"error: {NAN_ENV}='3,x' is not a comma-separated list of batch numbers"


@pytest.mark.parametrize("value", ["-1", "two"])
def test_max_nonfinite_steps_is_checked(value):
    with pytest.raises(ValueError, match="train.max_nonfinite_steps"):
        build_config({}, parse_overrides(["--train.max_nonfinite_steps", value]))
