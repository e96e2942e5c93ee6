"""Where a run's host memory goes, one process against FSDP on two, and what a run's end costs.

    python bench/memory.py                          # gpt2-774m, seq 128, global batch 2, fp32, AdamW, 2 steps
    python bench/memory.py --preset tiny --steps 3  # a quick look

Two parts, each run once per layout (one process, then FSDP dp_shard=2 on two processes under torchrun):

1. Phases: the model built (on the meta device where the layout shards it), sharded and materialized, then per
   step forward, backward and optimizer step, with each rank's resident memory after the phase and its peak
   so far (ru_maxrss), through the library's own build_model / parallelize / build_optimizers.
2. The run: `scalelm train` itself (train() with a trainer that times its steps and its end): each rank's peak
   resident memory, the median step, and after the last step the final evaluation, sample, hash and checkpoint
   write (the write reported apart).

Needs about 14 + 2 × 8 GiB free for gpt2-774m (the layouts run one after the other): check `free -g` first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def rss_gib() -> tuple[float, float]:
    """(resident now, peak resident) of this process in GiB."""
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def flags(args) -> list[str]:
    return ["--model.preset", args.preset, "--train.seq_len", str(args.seq), "--train.global_batch",
            str(args.batch), "--train.dtype", args.dtype, "--optim.name", args.optim, "--train.steps",
            str(args.steps), "--train.log_every", "1", "--train.eval_every", "0", "--train.eval_batches", "1",
            "--train.sample_tokens", str(args.sample_tokens), "--metrics.progress", "false", "--cpu.kernels", "false",
            "--cpu.matmul", "blas", "--parallel.dp_shard", "-1"]


class Rows(list):
    """(phase, resident GiB, peak GiB) rows, each also shown as it happens (stderr): a run stopped for memory
    still tells how far it got."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def append(self, row) -> None:
        print(f"rank {self.rank}: {row[0]}: {row[1]:.2f} GiB ({row[2]:.2f} peak)", file=sys.stderr, flush=True)
        super().append(row)


# ---- workers (run inside each process) -----------------------------------------------------------------
def phases_worker(train_flags: list[str]) -> None:
    import torch

    from scalelm.config import build_config, parse_overrides
    from scalelm.parallel import ParallelDims, init_distributed, parallelize
    from scalelm.train.host_memory import keep_freed_host_memory, return_freed_host_memory
    from scalelm.train.optim import build_optimizers
    from scalelm.train.run import build_model
    from scalelm.train.trainer import token_loss

    cfg = build_config({}, parse_overrides(train_flags))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # as train() does on a CPU
        return_freed_host_memory()
    elif cfg.cpu.keep_host_memory:
        keep_freed_host_memory()
    device = torch.device("cpu")
    rank, world = init_distributed(device)
    rows = Rows(rank)
    rows.append(("start", *rss_gib()))
    dims = ParallelDims.from_config(cfg, world) if world > 1 else None
    model = build_model(cfg, device, cfg.seed, meta=dims is not None)
    rows.append(("build", *rss_gib()))
    parts = [model]
    if dims is not None:
        par = parallelize(model, cfg, dims, dims.build_mesh("cpu"), device)
        parts, model = par.parts, par.parts[0]
    rows.append(("shard + materialize", *rss_gib()))
    (opt,) = build_optimizers(parts, cfg.optim)
    gen = torch.Generator().manual_seed(rank)
    local = cfg.train.global_batch // world
    tokens = local * cfg.train.seq_len
    for step in range(1, cfg.train.steps + 1):
        x = torch.randint(0, cfg.model.vocab_size, (local, cfg.train.seq_len + 1), generator=gen)
        loss = token_loss(model(x[:, :-1]), x[:, 1:], tokens * world)
        rows.append((f"step {step} forward", *rss_gib()))
        loss.backward()
        rows.append((f"step {step} backward", *rss_gib()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows.append((f"step {step} optimizer step", *rss_gib()))
    print("ROWS " + json.dumps({"rank": rank, "rows": rows}), flush=True)


def run_worker(train_flags: list[str], out: str) -> None:
    from scalelm.config import build_config, parse_overrides
    from scalelm.train.metrics import now
    from scalelm.train.run import train
    from scalelm.train.trainer import Trainer

    timings: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}

    def timed(name, method):
        def wrapper(*a, **k):
            start = now()
            try:
                return method(*a, **k)
            finally:
                timings.setdefault(name, []).append(now() - start)
                peaks[name] = rss_gib()[1]  # peak so far, after this phase's latest call
        return wrapper

    class TimedTrainer(Trainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            for name in ("train_step", "evaluate", "sample_text", "params_sha256", "save"):
                setattr(self, name, timed(name, getattr(self, name)))

    cfg = build_config({}, parse_overrides([*train_flags, "--out", out]))
    train(cfg, trainer_class=TimedTrainer)
    rank = int(os.environ.get("RANK", "0"))  # (train() has released the process group)
    print("RUN " + json.dumps({"rank": rank, "peak_gib": rss_gib()[1], "peak_after": peaks, **timings}), flush=True)


# ---- the driver ---------------------------------------------------------------------------------------
def launch(nproc: int, mode: str, train_flags: list[str], out: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    head = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc-per-node", str(nproc)]
    cmd = [*head, __file__, "--worker", mode, "--out", out, "--", *train_flags]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    tag = "ROWS " if mode == "phases" else "RUN "
    found = [json.loads(line[len(tag):]) for line in result.stdout.splitlines() if line.startswith(tag)]
    return sorted(found, key=lambda r: r["rank"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-774m")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--optim", default="adamw")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--sample-tokens", type=int, default=0)
    p.add_argument("--part", choices=("phases", "run", "both"), default="both")
    p.add_argument("--nproc", default="1,2", help="the layouts to run: 1 (one process), 2 (FSDP), or both")
    p.add_argument("--worker", choices=("phases", "run"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "phases":
        return phases_worker(args.rest)
    if args.worker == "run":
        return run_worker(args.rest, args.out)
    train_flags = flags(args)
    layouts = [(name, n) for name, n in (("one process", 1), ("FSDP dp_shard=2", 2)) if str(n) in args.nproc]
    print(f"{args.preset}, seq {args.seq}, global batch {args.batch}, {args.dtype}, {args.optim}, {args.steps} steps; "
          f"resident GiB after each phase (peak so far)")
    if args.part in ("phases", "both"):
        results = {name: launch(n, "phases", train_flags, "") for name, n in layouts}
        columns = [(name, r) for name, ranks in results.items() for r in ranks]
        print("| phase | " + " | ".join(f"{name} rank {r['rank']}" for name, r in columns) + " |")
        print("|---|" + "---:|" * len(columns))
        for i, (phase, *_) in enumerate(columns[0][1]["rows"]):
            print(f"| {phase} | " + " | ".join(f"{r['rows'][i][1]:.2f} ({r['rows'][i][2]:.2f})"
                                               for _, r in columns) + " |")
    if args.part in ("run", "both"):
        print("\n| layout | peak GiB per rank | vs one process | median step s | final eval s | sample s | "
              "hash s | after last step s (÷ step) | checkpoint write s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        base, notes = None, []
        for name, n in layouts:
            with tempfile.TemporaryDirectory() as out:
                ranks = launch(n, "run", train_flags, str(Path(out) / "run"))
            lead = ranks[0]
            peaks = [r["peak_gib"] for r in ranks]
            base = base or max(peaks)
            step = statistics.median(lead["train_step"])
            end = {k: sum(lead.get(k, [])) for k in ("evaluate", "sample_text", "params_sha256", "save")}
            after = end["evaluate"] + end["sample_text"] + end["params_sha256"]
            print(f"| {name} | {', '.join(f'{g:.2f}' for g in peaks)} | {max(peaks) / base:.2f}× | {step:.2f} | "
                  f"{end['evaluate']:.2f} | {end['sample_text']:.2f} | {end['params_sha256']:.2f} | "
                  f"{after:.2f} ({after / step:.2f}×) | {end['save']:.2f} |")
            notes.append(f"{name}: peak GiB after " + "; ".join(
                f"rank {r['rank']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.get("peak_after", {}).items())
                for r in ranks))
        print("\n".join(notes))


if __name__ == "__main__":
    main()
