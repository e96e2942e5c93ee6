"""Faults across processes: SIGKILL at random and inside a checkpoint write, then the same command again (one
process and dp2, bench/chaos.py); a killed dp2 run resumed by one process; a worker killed under torchrun
--max-restarts; a peer stopped with SIGSTOP. Few steps of the tiny model, the references shared by the tests of
this file."""

import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import losses

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import chaos  # noqa: E402  (bench/chaos.py: the same trial code the benchmark runs)

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
STEPS, EVERY = 8, 2


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict[str, tuple[Path, float]]:
    """The uninterrupted runs, one process and dp2."""
    root = tmp_path_factory.mktemp("chaos")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
        return {mode: chaos.reference(mode, root, STEPS, EVERY) for mode in ("single", "dp2")}


def test_killed_runs_restarted_with_the_same_command_end_identical(refs, tmp_path):
    """One kill at a random moment of a single-process run, one inside a dp2 checkpoint write; the killed dp2 run
    is also resumed by ONE process (resume across layouts): the same per-step losses as dp2, within float noise."""
    rng = random.Random(0)
    single = chaos.trial("single", tmp_path / "single", *refs["single"], ["random"], STEPS, EVERY, rng)
    assert single.kills == ["random"] and single.identical, single

    killed = tmp_path / "dp2-as-killed"
    dp2 = chaos.trial("dp2", tmp_path / "dp2", *refs["dp2"], ["save"], STEPS, EVERY, rng,
                      on_kill=lambda out: shutil.copytree(out, killed))
    assert dp2.kills == ["save"] and dp2.identical, dp2  # killed with a .tmp_step_* directory half written

    assert any(p.name.startswith(".tmp_step_") for p in (killed / "checkpoints").iterdir())
    result = subprocess.run(chaos.command("single", killed, STEPS, EVERY), env=chaos.environment(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    ref, got = losses(refs["dp2"][0]), losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(ref[s] - got[s]) for s in ref) <= 1e-5


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_ends_identical(refs, tmp_path):
    """`scalelm train --nproc 2 --max-restarts 2`, one worker SIGKILLed mid-run: torchrun restarts the group, which
    resumes from the last checkpoint and ends with the uninterrupted dp2 run's weights, each step logged once."""
    out = tmp_path / "elastic"
    outcome = chaos.trial("elastic", out, *refs["dp2"], ["worker"], STEPS, EVERY, random.Random(1))
    assert outcome.kills == ["worker"] and outcome.launches == 1 and outcome.identical, outcome
    assert "exitcode: -9" in out.with_suffix(".log").read_text()  # the group did lose a worker and restart


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stopped_peer_ends_the_run_with_its_rank_named(tmp_path):
    """Rank 1 gets SIGSTOP mid-run: rank 0 stops within parallel.timeout_s + 30 s with one line naming rank 1;
    SIGUSR1 meanwhile dumps rank 0's Python stack."""
    timeout_s = 5
    env = dict(chaos.environment(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2")
    env.pop(chaos.durable.SAVE_PAUSE_ENV)
    cmd = [sys.executable, "-m", "scalelm", "train", *chaos.TINY, "--train.steps", "100000", "--out",
           str(tmp_path / "run"), "--parallel.timeout_s", str(timeout_s)]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.is_file() and '"loss"' in metrics.read_text()) and time.time() < deadline:
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        time.sleep(1)
        procs[0].send_signal(signal.SIGUSR1)  # a stack dump on request; the run carries on
        _, err = procs[0].communicate(timeout=timeout_s + 30)
        elapsed = time.time() - stopped
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert elapsed <= timeout_s + 30
    assert procs[0].returncode == 2
    assert "most recent call first" in err  # faulthandler's dump of every thread
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: ") and f"parallel.timeout_s={timeout_s}" in last, err[-3000:]
    assert "rank 1 (silent for" in last and "stopped answering" in last, last
