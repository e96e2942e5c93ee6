"""Bytes FSDP hands to collectives per step, by kind, fp32 against bf16 — here and in another checkout.

    python bench/fsdp_bytes.py                                  # this tree
    git worktree add ../before COMMIT && python bench/fsdp_bytes.py --before ../before

Each layout is `scalelm train` on two processes (FSDP dp_shard=2, zero 3) of the given preset, with a trainer
that runs every step under `CommCounter` (parallel/comm.py) and prints rank 0's bytes per collective kind; the
median over the steps after the first is reported. The `--before` tree runs the same worker with its own code
(it needs train(trainer_class=...) and CommCounter.by_op, both older than bf16 FSDP), so the ratio compares
the two commits on the same machine in one sitting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def worker(train_flags: list[str]) -> None:
    from scalelm.config import build_config, parse_overrides
    from scalelm.parallel.comm import CommCounter
    from scalelm.train.run import train
    from scalelm.train.trainer import Trainer

    steps: list[dict[str, int]] = []

    class CountingTrainer(Trainer):
        def train_step(self):
            with CommCounter() as comm:
                out = super().train_step()
            steps.append(dict(comm.by_op))
            return out

    train(build_config({}, parse_overrides(train_flags)), trainer_class=CountingTrainer)
    if int(os.environ.get("RANK", "0")) == 0:  # (train() has released the process group)
        print("BYTES " + json.dumps(steps), flush=True)


def kind(op: str) -> str:
    return "all-gather" if "gather" in op else "reduce-scatter" if "reduce_scatter" in op else "other"


def measure(src: Path, args, dtype: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        flags = ["--model.preset", args.preset, "--train.seq_len", str(args.seq), "--train.global_batch",
                 str(args.batch), "--train.dtype", dtype, "--optim.name", "adamw", "--train.steps", str(args.steps),
                 "--train.log_every", str(args.steps), "--train.eval_every", "0", "--train.eval_batches", "1",
                 "--train.sample_tokens", "0", "--metrics.progress", "false", "--out", str(Path(out) / "run")]
        env = dict(os.environ, PYTHONPATH=str(src / "src"), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               "--worker", "--", *flags]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{src}: {dtype} run failed:\n{result.stderr[-3000:]}")
    steps = next(json.loads(line[6:]) for line in result.stdout.splitlines() if line.startswith("BYTES "))
    per_kind = [{k: sum(b for op, b in step.items() if kind(op) == k) for k in ("all-gather", "reduce-scatter",
                                                                                  "other")} for step in steps[1:]]
    return {k: statistics.median(s[k] for s in per_kind) for k in ("all-gather", "reduce-scatter", "other")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--before", type=Path, help="another checkout to measure with the same worker")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.rest)
    trees = [("this tree", HERE)] + ([("before", args.before.resolve())] if args.before else [])
    results = {(name, dtype): measure(src, args, dtype) for name, src in trees for dtype in ("fp32", "bf16")}
    print(f"{args.preset}, seq {args.seq}, global batch {args.batch}, FSDP dp_shard=2 zero 3; rank 0 bytes per step")
    print("| tree | train.dtype | all-gather | reduce-scatter | other | all-gather vs before |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, dtype), r in results.items():
        before = results.get(("before", dtype))
        ratio = f"{r['all-gather'] / before['all-gather']:.3f}×" if before and before["all-gather"] else ""
        print(f"| {name} | {dtype} | {r['all-gather']:,.0f} | {r['reduce-scatter']:,.0f} | {r['other']:,.0f} | "
              f"{ratio} |")


if __name__ == "__main__":
    main()
