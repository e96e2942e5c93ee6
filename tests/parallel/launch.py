"""Helpers for multi-process tests: start torchrun on this machine, compare runs with the single-process one."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import torch
from helpers import TINY, losses, run_multiprocess

import scalelm
from scalelm.train.checkpoint import unique_state

HERE = Path(__file__).parent
SRC = HERE.parents[1] / "src"
# 10 steps, a loss line every step; evaluation only at the end (2 batches) to keep launches short
BASE = [*TINY, "--train.steps", "10", "--train.log_every", "1", "--train.eval_every", "0", "--train.eval_batches", "2"]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), *sys.path]), OMP_NUM_THREADS="1")


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS` (a free port is picked, so launches may overlap)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    result = run_multiprocess(cmd, env=env(), timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd[3:])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    return result


def run_layouts(nproc: int, root: Path, layouts: dict[str, list[str]], base: list[str] = BASE) -> None:
    """Train every layout (name → extra flags) in one launch of `nproc` processes, into root/name."""
    torchrun(nproc, str(HERE / "worker.py"), str(root), json.dumps(list(layouts.items())), *base)


def rel_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5
    den = sum((a[k].double() ** 2).sum() for k in a) ** 0.5
    return float(num / den)


def assert_parity(reference: Path, run: Path, loss_tol: float = 1e-5, weight_tol: float = 1e-5) -> None:
    """Per-step losses within loss_tol (absolute), final gathered weights within weight_tol (relative L2)."""
    ref, got = losses(reference), losses(run)
    assert sorted(got) == sorted(ref), f"steps differ: {sorted(got)} vs {sorted(ref)}"  # one line per step: rank 0
    worst = max(abs(ref[s] - got[s]) for s in ref)
    assert worst <= loss_tol, f"{run.name}: max |loss - single-process loss| = {worst:.2e} > {loss_tol}"
    dist = rel_l2(unique_state(scalelm.load(reference)), unique_state(scalelm.load(run)))
    assert dist <= weight_tol, f"{run.name}: relative L2 distance of the final weights {dist:.2e} > {weight_tol}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_torchrun_line(script: str, nodes: int, head: str = "127.0.0.1") -> list[str]:
    """The torchrun command of a `scalelm slurm` script, as srun would start it on each node, with the Slurm
    variables filled in for this machine (every "node" is this machine, the head node is `head`)."""
    text = script.replace("\\\n", " ")
    line = next(row for row in text.splitlines() if "torch.distributed.run" in row)
    line = line[line.index("python -m torch.distributed.run"):]
    line = (line.replace("$SLURM_NNODES", str(nodes)).replace("$SLURM_JOB_ID", "loopback")
            .replace("$head_node", head))
    return [sys.executable, *shlex.split(line)[1:]]


def launch_nodes(line: list[str], nodes: int, timeout: int = 600) -> None:
    """Start `nodes` torchrun agents of `line` at once (as srun does, one per node) and wait for all of them."""
    agents = [subprocess.Popen(line, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(nodes)]
    outputs = [agent.communicate(timeout=timeout) for agent in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, f"a torchrun agent failed:\n{err[-6000:]}"
