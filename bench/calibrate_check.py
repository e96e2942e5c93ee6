"""Acceptance 4 of the plan issue: does `plan --hardware local` predict scalelm's own CPU runs?

    python bench/calibrate_check.py                                  # calibrate, then the default runs, 1 process
    python bench/calibrate_check.py --hardware local.toml --layouts 1,dp2,tp2,pp2

1. Hardware: `scalelm calibrate --out FILE` measures this machine (or `--hardware FILE` reuses a file, and
   calibrates into it when it does not exist yet). Calibration is per thread count: a single-process run uses
   torch's default thread count, so it is predicted with a file measured the same way; under torchrun every rank
   runs with OMP_NUM_THREADS=1, so multi-process layouts are predicted with a file calibrated with
   OMP_NUM_THREADS=1 (`--hardware-1t FILE`, same reuse rule).
2. For each run (preset + trainer overrides) and layout, the trainer runs for real:
   `python -m scalelm train --model.preset P --train.steps N --train.log_every N/2 ... --out TMPDIR`, and the
   measured step time is `step_time_s` of the last metrics line (the mean over the second half of the steps,
   so the first, warming-up steps are left out).
3. The perf model (no torch) predicts the same step: the same model, batch, sequence, precision (the trainer's
   resolved `train.dtype`, read from its log), micro-batch and layout, the `scalelm` framework profile.

A layout the trainer cannot run yet (it rejects `--nproc` or a `--parallel.*` key) prints
"n/a (trainer lacks it)". The machine is shared: timings are noisy, so the table prints the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

from scalelm.config import TrainConfig
from scalelm.model.presets import get_preset
from scalelm.perf.frameworks import PROFILES
from scalelm.perf.hardware import load_hardware
from scalelm.perf.layout import Layout
from scalelm.perf.report import table
from scalelm.perf.step import predict_step

DEFAULT_RUNS = [
    "shakespeare-char:",  # the default run: bf16 autocast, batch 32, Muon where the layout allows it
    "shakespeare-char:--train.dtype fp32 --train.global_batch 16",
    "tiny:",
]
LAYOUTS = {
    # name: (processes, trainer flags, perf-model layout fields)
    "1": (1, [], {}),
    "dp2": (2, [], {"dp": 2, "zero": 3}),
    "tp2": (2, ["--parallel.tp", "2"], {"tp": 2, "zero": 3}),
    "pp2": (2, ["--parallel.pp", "2"], {"pp": 2, "zero": 3}),
}
LACKS = re.compile(r"unknown (config key|option|argument)|unrecognized arguments|no such option|nproc", re.IGNORECASE)


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))


def calibration_threads(path: Path) -> int | None:
    with open(path, "rb") as f:
        return tomllib.load(f).get("calibration", {}).get("threads")


def ensure_hardware(path: Path | None, threads: int | None, workdir: Path) -> Path:
    """Reuse `path` if it exists, else run `scalelm calibrate --out path` (OMP_NUM_THREADS=threads if given)."""
    path = path or workdir / f"local-{threads or 'default'}t.toml"
    if path.exists():
        return path
    env = _env()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"calibrating ({threads or 'default'} threads per process): scalelm calibrate --out {path}", flush=True)
    subprocess.run([sys.executable, "-m", "scalelm", "calibrate", "--out", str(path)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return path


def parse_run(spec: str) -> tuple[str, list[str]]:
    preset, _, args = spec.partition(":")
    return preset.strip(), shlex.split(args)


def _overrides(args: list[str]) -> dict[str, str]:
    out, i = {}, 0
    while i < len(args):
        if args[i].startswith("--") and i + 1 < len(args):
            out[args[i][2:]] = args[i + 1]
            i += 2
        else:
            i += 1
    return out


def train(preset: str, args: list[str], layout: str, steps: int, workdir: Path) -> dict:
    """Run the trainer; {'step_s', 'dtype', 'threads'} or {'na': reason}."""
    nproc, flags, _ = LAYOUTS[layout]
    out = Path(tempfile.mkdtemp(prefix=f"{preset}-{layout}-", dir=workdir))
    cmd = [sys.executable, "-m", "scalelm", "train", "--model.preset", preset, "--train.steps", str(steps),
           "--train.log_every", str(max(1, steps // 2)), "--metrics.progress", "false", "--train.eval_every", "0",
           "--train.eval_batches", "1", "--train.sample_tokens", "0", "--out", str(out), *args]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), *flags]
    proc = subprocess.run(cmd, env=_env(), check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        if nproc > 1 and LACKS.search(proc.stderr):
            return {"na": "n/a (trainer lacks it)"}
        return {"na": f"failed (exit {proc.returncode}): {err[:80]}"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = [x for x in lines if "step_time_s" in x]
    if not timed:
        return {"na": "no step_time_s in metrics.jsonl"}
    log = proc.stdout + proc.stderr
    dtype = re.search(r"device\s+\w+,\s+(fp32|bf16|fp16)", log)  # the console wraps lines anywhere
    threads = re.search(r"\((\d+)\s+threads\)", log)
    with open(out / "config.toml", "rb") as f:
        optimizer = tomllib.load(f).get("optim", {}).get("name", "adamw")  # saved resolved (auto → muon/adamw)
    return {"step_s": timed[-1]["step_time_s"], "dtype": dtype.group(1) if dtype else None,
            "threads": int(threads.group(1)) if threads else None, "optimizer": optimizer}


def predict(preset: str, args: list[str], layout: str, dtype: str, hw_path: Path, optimizer: str) -> float:
    over = _overrides(args)
    cfg = get_preset(preset)
    model_over = {}
    for k, v in over.items():
        if k.startswith("model.") and k[6:] in {f.name for f in dataclasses.fields(cfg)}:
            cur = getattr(cfg, k[6:])
            model_over[k[6:]] = type(cur)(v) if isinstance(cur, (int, float)) and not isinstance(cur, bool) else v
    cfg = dataclasses.replace(cfg, **model_over)
    t = TrainConfig()
    gbs = int(over.get("train.global_batch", t.global_batch))
    seq = int(over.get("train.seq_len", t.seq_len)) or cfg.max_seq_len
    mb = int(over.get("train.micro_batch", t.micro_batch))
    _, _, fields = LAYOUTS[layout]
    dp, pp = fields.get("dp", 1), fields.get("pp", 1)
    local = gbs // dp
    if pp > 1:  # torch.distributed.pipelining: pp_microbatches defaults to pp
        mb = local // pp
    lo = Layout(micro_batch=mb or local, precision=dtype, optimizer=optimizer, **fields)
    return predict_step(cfg, load_hardware(str(hw_path)), lo, seq, gbs, PROFILES["scalelm"], strict=False).step_time_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hardware", type=Path, help="calibrated file for 1-process runs (reused if it exists)")
    p.add_argument("--hardware-1t", type=Path, help="file calibrated with OMP_NUM_THREADS=1, for torchrun ranks")
    p.add_argument("--layouts", default="1", help="comma list of 1, dp2, tp2, pp2 (default 1)")
    p.add_argument("--run", action="append", metavar="PRESET:ARGS",
                   help="preset and trainer overrides, repeatable (default: shakespeare-char fp32 b16 s256; tiny)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run; the second half is timed")
    args = p.parse_args()
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        p.error(f"unknown layout {bad[0]!r}; use {', '.join(LAYOUTS)}")
    runs = [parse_run(r) for r in (args.run or DEFAULT_RUNS)]
    import torch  # only for the thread count the trainer will use

    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="calibrate-check-") as tmp:  # run dirs (and default calibrations)
        return _check(args, runs, layouts, default_threads, Path(tmp))


def _check(args, runs, layouts, default_threads: int, workdir: Path) -> int:
    hw1 = ensure_hardware(args.hardware, None, workdir)
    have = calibration_threads(hw1)
    if have is not None and have != default_threads:
        print(f"warning: {hw1} was calibrated with {have} threads; the trainer will use {default_threads}")
    hw_1t = None
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    rows, errors = [], []
    for preset, extra in runs:
        for layout in layouts:
            name = f"{preset} {' '.join(extra)}".strip()
            m = train(preset, extra, layout, args.steps, workdir)
            if "na" in m:
                rows.append([name, layout, "-", "-", "-", m["na"]])
                print(f"  {name} [{layout}]: {m['na']}", flush=True)
                continue
            hw_path = hw1
            if LAYOUTS[layout][0] > 1:
                hw_1t = hw_1t or ensure_hardware(args.hardware_1t, 1, workdir)
                hw_path = hw_1t
            dtype = m["dtype"] or _overrides(extra).get("train.dtype", "fp32")
            pred = predict(preset, extra, layout, dtype, hw_path, m["optimizer"])
            err = 100 * (pred - m["step_s"]) / m["step_s"]
            errors.append(abs(err))
            rows.append([name, layout, f"{m['threads'] or '?'}", f"{pred:.4f}", f"{m['step_s']:.4f}", f"{err:+.1f}"])
            print(f"  {name} [{layout}, {dtype}, {m['optimizer']}]: predicted {pred:.4f} s, measured {m['step_s']:.4f} s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (timings on a shared machine "
          "are noisy)\n")
    print(table(["run", "layout", "threads/proc", "predicted step_s", "measured step_s", "error %"], rows))
    if errors:
        errors.sort()
        print(f"\nwithin 15%: {sum(e <= 15 for e in errors)}/{len(errors)}; median |error| "
              f"{errors[len(errors) // 2]:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
