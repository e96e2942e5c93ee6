"""The GPU check: what a first run on one GPU must show, in one script of a few minutes.

    python bench/gpu_check.py              # one CUDA GPU, about 5-8 minutes
    python bench/gpu_check.py --dry-run    # the same checks on the CPU with the tiny preset (the test suite runs it)

1. bf16 + torch.compile: `scalelm train` of a ~1B-parameter preset (gpt3-1.3b) at seq 2048: tokens/s and MFU
   against the card's data-sheet peak (the trainer's own numbers, median of the logged intervals after the first,
   which holds compilation), and peak memory against the planner's prediction for the run.
2. fp16 + GradScaler: 20 steps of the same preset, uncompiled: every loss finite, the last below the first.
3. FSDP2 on one rank over NCCL (bf16 parameters, fp32 reduction), built on the meta device and materialized
   on the GPU: the same batches as the plain model in the same precision, losses compared step by step.

A table at the end; the exit code is 1 when a check fails. Run it on the GPU machine with the project installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def settings(dry_run: bool) -> dict:
    if dry_run:
        return {"device": "cpu", "preset": "tiny", "seq": 32, "batch": 4, "steps": 4, "fp16_steps": 4,
                "fsdp_steps": 3, "compile": False, "fp16": "bf16", "log_every": 1}
    return {"device": "cuda", "preset": "gpt3-1.3b", "seq": 2048, "batch": 8, "steps": 30, "fp16_steps": 20,
            "fsdp_steps": 10, "compile": True, "fp16": "fp16", "log_every": 5}


def train_run(s: dict, out: Path, dtype: str, steps: int, compile_: bool) -> list[dict]:
    """`scalelm train` (in this process, as the CLI runs it); its metrics lines."""
    import torch

    from scalelm.cli import main as scalelm

    if s["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()  # each run reports its own peak
    args = ["train", "--device", s["device"], "--model.preset", s["preset"], "--train.seq_len", str(s["seq"]),
            "--train.global_batch", str(s["batch"]), "--train.dtype", dtype, "--train.steps", str(steps),
            "--train.log_every", str(s["log_every"]), "--train.eval_every", "0", "--train.eval_batches", "1",
            "--train.sample_tokens", "0", "--metrics.progress", "false", "--optim.name", "adamw",
            "--optim.warmup_steps", "5", "--out", str(out), *(["--train.compile", "true"] if compile_ else [])]
    if scalelm(args) != 0:
        raise RuntimeError(f"scalelm {' '.join(args)} failed")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_bf16_compile(s: dict, root: Path) -> list[tuple[str, str, bool]]:
    records = train_run(s, root / "bf16", "bf16", s["steps"], s["compile"])
    steps = [r for r in records if "loss" in r]
    timed = steps[1:] or steps
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    mem = max(r["mem_gib"] for r in steps)
    predicted = steps[0].get("predicted_mem_gib")
    finite = all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e4 for r in steps)
    rows = [(f"bf16{' + compile' if s['compile'] else ''}, {s['preset']}, seq {s['seq']}, batch {s['batch']}",
             f"{tps:,.0f} tokens/s, MFU {statistics.median(mfu):.3f}" if mfu else f"{tps:,.0f} tokens/s, MFU n/a",
             finite and steps[-1]["loss"] < steps[0]["loss"]),
            ("peak memory vs the planner", f"{mem:.2f} GiB measured, "
             + (f"{predicted:.2f} GiB predicted ({mem / predicted:.2f}×)" if predicted else "no prediction"), True)]
    return rows


def check_fp16(s: dict, root: Path) -> list[tuple[str, str, bool]]:
    steps = [r for r in train_run(s, root / "fp16", s["fp16"], s["fp16_steps"], False) if "loss" in r]
    losses = [r["loss"] for r in steps]
    ok = all(x == x and abs(x) < 1e4 for x in losses) and losses[-1] < losses[0]
    what = "fp16 + GradScaler" if s["fp16"] == "fp16" else "bf16 (fp16 needs CUDA: dry run)"
    return [(f"{what}, {s['fp16_steps']} steps", f"loss {losses[0]:.3f} -> {losses[-1]:.3f}", ok)]


def check_fsdp_one_rank(s: dict) -> list[tuple[str, str, bool]]:
    """The plain model and FSDP2 (one rank, meta build) train on the same batches in bf16: losses side by side."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from scalelm.config import build_config, parse_overrides
    from scalelm.parallel.data_parallel import apply_fsdp
    from scalelm.parallel.materialize import materialize
    from scalelm.train.optim import build_optimizers
    from scalelm.train.run import build_model
    from scalelm.train.trainer import token_loss

    device = torch.device(s["device"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group(backend, rank=0, world_size=1)
    cfg = build_config({}, parse_overrides(["--model.preset", s["preset"], "--train.seq_len", str(s["seq"]),
                                            "--optim.name", "adamw", "--optim.lr", "1e-4"]))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (s["batch"], s["seq"] + 1), generator=gen)
               for _ in range(s["fsdp_steps"])]
    results = {}
    try:
        for name in ("plain", "fsdp"):
            if name == "plain":
                model = build_model(cfg, device, cfg.seed)
            else:
                model = build_model(cfg, device, cfg.seed, meta=True)
                apply_fsdp(model, init_device_mesh(device.type, (1,), mesh_dim_names=("dp_shard",)), 3,
                           dtypes=(torch.bfloat16, torch.float32))
                materialize([model], device, cfg.seed)
            (opt,) = build_optimizers(model, cfg.optim)
            losses, start = [], time.perf_counter()
            for x in batches:
                x = x.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    logits = model(x[:, :-1])
                loss = token_loss(logits, x[:, 1:], x[:, 1:].numel())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
            results[name] = (losses, (time.perf_counter() - start) / len(batches))
            del model, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    (plain, plain_s), (fsdp, fsdp_s) = results["plain"], results["fsdp"]
    worst = max(abs(a - b) for a, b in zip(plain, fsdp))
    # bf16 parameters (FSDP) against bf16 autocast of fp32 weights (plain): equal up to bf16 rounding.
    return [(f"FSDP2 one rank over {backend}, bf16 parameters, {s['fsdp_steps']} steps",
             f"max |loss - plain loss| {worst:.2e}; {fsdp_s:.3f} s/step vs plain {plain_s:.3f}", worst < 5e-2)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same checks on the CPU with the tiny preset")
    args = p.parse_args()
    s = settings(args.dry_run)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
            return 2
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows: list[tuple[str, str, bool]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        for check in (check_bf16_compile, check_fp16):
            rows += check(s, Path(tmp))
    rows += check_fsdp_one_rank(s)
    print("| check | result | ok |\n|---|---|---|")
    for what, result, ok in rows:
        print(f"| {what} | {result} | {'yes' if ok else 'NO'} |")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
