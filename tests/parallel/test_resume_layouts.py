"""Acceptance 3 (and 2 from a real command line): save at dp2×tp2, resume at pp2 and at one process; the
continued losses equal an uninterrupted single-process run's, and no batch is skipped or repeated."""

import json
import pickle
import shutil
import sys

import pytest
from helpers import TINY, losses, metrics, run_multiprocess
from helpers import train as train_single
from launch import BASE, assert_parity, env, torchrun

from scalelm.train.checkpoint import checkpoint_dirs

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

ARGS = [*BASE, "--checkpoint.every", "5", "--checkpoint.keep", "3"]


def _stop_after_step_5(run_dir):
    """As if the run had been killed after its step-5 checkpoint."""
    shutil.rmtree(checkpoint_dirs(run_dir)[-1])
    assert checkpoint_dirs(run_dir)[-1].name == "step_00000005"


def test_resume_on_other_layouts(tmp_path, monkeypatch):
    assert train_single(tmp_path / "single", *ARGS[len(TINY):]) == 0

    # dp2 × tp2 on 4 processes, launched as a user would: torchrun -m scalelm train ...
    saved = tmp_path / "dp2_tp2"
    torchrun(4, "-m", "scalelm", "train", *ARGS, "--parallel.tp", "2", "--out", str(saved))
    assert_parity(tmp_path / "single", saved)
    _stop_after_step_5(saved)
    assert (checkpoint_dirs(saved)[-1] / ".metadata.json").is_file()  # a DCP checkpoint

    # ... resumed by pp2 on 2 processes, through the `--nproc` convenience
    pp2 = tmp_path / "pp2"
    shutil.copytree(saved, pp2)
    result = run_multiprocess([sys.executable, "-m", "scalelm", "train", "--nproc", "2", *ARGS, "--parallel.pp", "2",
                               "--out", str(pp2)], env=env(), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stderr and "at step 5" in result.stderr

    # ... and by one plain process, which must not unpickle anything to read the DCP checkpoint
    one = tmp_path / "one"
    shutil.copytree(saved, one)

    def no_pickle(*args, **kwargs):
        raise AssertionError("a checkpoint load called pickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    assert train_single(one, *ARGS[len(TINY):]) == 0
    monkeypatch.undo()

    for run in (pp2, one):
        assert_parity(tmp_path / "single", run)  # steps 1-5 from dp2×tp2, 6-10 from the new layout
        steps = [r["step"] for r in metrics(run) if "loss" in r]
        assert steps == list(range(1, 11))  # every step once: none skipped, none repeated
        state = json.loads((checkpoint_dirs(run)[-1] / "state.json").read_text())
        assert state["loader"]["step"] == 10
        assert losses(run) == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
