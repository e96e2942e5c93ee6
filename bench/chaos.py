"""Chaos: kill `scalelm train` with SIGKILL at random moments (some in the middle of a checkpoint write) and restart
it with the same command until it finishes; every trial must end with the uninterrupted run's params_sha256, the
same per-step losses, each step exactly once in metrics.jsonl, and no temporary or damaged checkpoint left.

    python bench/chaos.py --trials 20                  # alternates one process and dp2 (torchrun, gloo)
    python bench/chaos.py --trials 4 --modes dp2 --steps 16
    python bench/chaos.py --trials 4 --modes elastic   # one worker killed; torchrun --max-restarts restarts the group

Prints one row per trial and then `trials N, identical N, corrupt 0`. A kill "in a save" waits for the checkpoint's
temporary directory to appear; the test hook SCALELM_TEST_SAVE_PAUSE_S holds every save open a moment so it can.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scalelm.train import durable
from scalelm.train.checkpoint import CHECKPOINT_DIR, checkpoint_dirs

MODES = {"single": [], "dp2": ["--nproc", "2"], "elastic": ["--nproc", "2", "--max-restarts", "2"]}
"""elastic: torchrun restarts the group itself after one worker is killed; the others are relaunched by chaos."""
TINY = ["--model.preset", "tiny", "--train.dtype", "fp32", "--train.global_batch", "8", "--train.seq_len", "32",
        "--train.sample_tokens", "0", "--metrics.progress", "false", "--optim.warmup_steps", "3", "--optim.name",
        "adamw", "--train.eval_every", "0", "--train.eval_batches", "1", "--train.log_every", "1", "--cpu.matmul",
        "blas"]
"""No dropout, so a dp2 run resumed by one process can be compared with dp2 step by step (dropout masks are drawn
per rank); tests/train/test_trainer.py checks that a resume with dropout is exact."""
SAVE_PAUSE_S = "0.3"


def command(mode: str, out: Path, steps: int, every: int) -> list[str]:
    return [sys.executable, "-m", "scalelm", "train", *MODES[mode], *TINY, "--train.steps", str(steps),
            "--checkpoint.every", str(every), "--out", str(out)]


def environment() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **{durable.SAVE_PAUSE_ENV: SAVE_PAUSE_S})


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """In a session of its own, so one killpg takes torchrun and all its workers, as a lost machine would."""
    with open(log, "a") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=environment(), start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def kill_one_worker(proc: subprocess.Popen, rng: random.Random) -> bool:
    """SIGKILL one training process of a torchrun launch (a child of its agent), as a crashed GPU worker would."""
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == proc.pid:  # fields[1]: the parent's pid
            workers.append(int(stat.parent.name))
    if not workers:
        return False
    try:
        os.kill(rng.choice(workers), signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def in_a_save(out: Path) -> bool:
    root = out / CHECKPOINT_DIR
    return root.is_dir() and any(p.name.startswith(".tmp_step_") for p in root.iterdir())


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@dataclass
class Outcome:
    mode: str
    kills: list[str] = field(default_factory=list)
    launches: int = 0
    identical: bool = False
    corrupt: bool = False
    note: str = ""


def check(out: Path, reference: Path) -> tuple[bool, bool, str]:
    """(identical, corrupt, note) of a finished run against the uninterrupted one."""
    root = out / CHECKPOINT_DIR
    left = [p.name for p in root.iterdir() if p.name.startswith(".tmp")] if root.is_dir() else []
    damaged = [c.name for c in checkpoint_dirs(out) if durable.check(c) is not None]
    if left or damaged:
        return False, True, f"left {left}, damaged {damaged}"
    got, ref = records(out), records(reference)
    steps = [r["step"] for r in got if "loss" in r and "event" not in r]
    if steps != sorted(set(steps)) or steps != [r["step"] for r in ref if "loss" in r and "event" not in r]:
        return False, False, f"logged steps {steps}"
    losses = {r["step"]: r["loss"] for r in got if "loss" in r}
    if losses != {r["step"]: r["loss"] for r in ref if "loss" in r}:
        return False, False, "losses differ"
    end, ref_end = got[-1], ref[-1]
    if end.get("event") != "end" or end["params_sha256"] != ref_end["params_sha256"]:
        return False, False, "final weights differ"
    return True, False, ""


def reference(mode: str, root: Path, steps: int, every: int) -> tuple[Path, float]:
    """The uninterrupted run and its wall time."""
    out = root / f"reference-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = start(command(mode, out, steps, every), root / f"reference-{mode}.log")
    if proc.wait() != 0:
        raise RuntimeError(f"the uninterrupted {mode} run failed; see {root / f'reference-{mode}.log'}")
    return out, time.perf_counter() - t0


def started_training(out: Path, launched: float) -> bool:
    """This launch has reached its loop: it started (or, resuming, trimmed) metrics.jsonl."""
    log = out / "metrics.jsonl"
    return log.is_file() and log.stat().st_mtime >= launched


def trial(mode: str, out: Path, ref: Path, wall_s: float, kills: list[str], steps: int, every: int,
          rng: random.Random, max_launches: int = 8, on_kill: Callable[[Path], None] | None = None) -> Outcome:
    """Run, killing once per entry of `kills` ("save": during a checkpoint write, "random": at a random moment
    of its training), then restart with the same command until the run finishes; `on_kill(out)` after each kill."""
    outcome = Outcome(mode)
    cmd = command(mode, out, steps, every)
    train_s = records(ref)[-1]["train_wall_s"]
    pending = list(kills)
    while outcome.launches < max_launches:
        outcome.launches += 1
        proc = start(cmd, out.with_suffix(".log"))
        if pending:
            how = pending.pop(0)
            launched, deadline = time.time(), time.perf_counter() + 3 * wall_s
            while proc.poll() is None and time.perf_counter() < deadline:
                if how == "save" and in_a_save(out):
                    break
                if how in ("random", "worker") and started_training(out, launched):  # a moment of its training
                    deadline = min(deadline, time.perf_counter() + rng.uniform(0.0, train_s))
                    how += " "
                time.sleep(0.01)
            how = how.strip()
            if how == "worker":  # the launch restarts its group and must finish on its own
                outcome.kills.append("worker" if kill_one_worker(proc, rng) else "worker-missed")
            elif proc.poll() is None:
                kill(proc)
                outcome.kills.append(how + ("" if how == "random" or in_a_save(out) else "-missed"))
                if on_kill is not None:
                    on_kill(out)
                continue
        if proc.wait() == 0:
            outcome.identical, outcome.corrupt, outcome.note = check(out, ref)
            return outcome
        outcome.note = f"exit code {proc.returncode}"
    outcome.corrupt = True
    outcome.note = outcome.note or "never finished"
    return outcome


def run(trials: int, modes: list[str], root: Path, steps: int, every: int, seed: int,
        kills_per_trial: int = 2) -> list[Outcome]:
    rng = random.Random(seed)
    refs = {mode: reference(mode, root, steps, every) for mode in modes}
    outcomes = []
    for i in range(trials):
        mode = modes[i % len(modes)]
        # Alternate the first kill between a checkpoint write and a random moment; the rest are random.
        kills = ["save" if (i // len(modes)) % 2 == 0 else "random"] + ["random"] * (kills_per_trial - 1)
        if mode == "elastic":
            kills = ["worker"]
        out = root / f"trial-{i:02d}-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        ref, wall_s = refs[mode]
        outcome = trial(mode, out, ref, wall_s, kills, steps, every, rng)
        outcomes.append(outcome)
        print(f"{i:>5}  {mode:<6}  {', '.join(outcome.kills) or '-':<24}  {outcome.launches:>8}  "
              f"{'yes' if outcome.identical else 'no':<9}  {outcome.note}", flush=True)
    return outcomes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--modes", default="single,dp2", help="comma list of: " + ", ".join(MODES))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=3, help="checkpoint every N steps")
    p.add_argument("--kills", type=int, default=2, help="kills per trial before it may finish")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="work directory (default: a temporary one, removed after)")
    args = p.parse_args()
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes) or args.trials < 1:
        p.error(f"--modes takes {', '.join(MODES)}; --trials at least 1")
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="scalelm-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"{'trial':>5}  {'mode':<6}  {'kills':<24}  {'launches':>8}  {'identical':<9}  note")
    try:
        outcomes = run(args.trials, modes, root, args.steps, args.every, args.seed, args.kills)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    identical = sum(o.identical for o in outcomes)
    corrupt = sum(o.corrupt for o in outcomes)
    print(f"trials {len(outcomes)}, identical {identical}, corrupt {corrupt}")
    return 0 if identical == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
