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
3. The trainer's own forecast (`scalelm.train.forecast.predict_run`, the torch-free step model) predicts the same
   step from the same config and layout, at the precision the trainer resolved (read from its log).

Layout `1t` is one process with OMP_NUM_THREADS=1, predicted with the 1-thread file: not a real configuration,
but it separates the 1-thread compute model from what two processes side by side add (collectives, FSDP hooks).

A layout the trainer cannot run yet (it rejects `--nproc` or a `--parallel.*` key) prints
"n/a (trainer lacks it)". The machine is shared: timings are noisy, so the table prints the load average, and
"speed vs cal": the machine's speed around each run (scalelm.calibrate.speed_probe_gflops with the run's threads
per process, before and after the run, averaged) against the same probe in the calibration file. A row whose
error follows that column says the machine drifted, not that the model did.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

from scalelm.config import build_config, parse_overrides
from scalelm.perf.hardware import load_hardware
from scalelm.perf.report import table
from scalelm.train.forecast import predict_run

DEFAULT_RUNS = [
    "shakespeare-char:",  # the default run: bf16 autocast, batch 32, Muon where the layout allows it
    "shakespeare-char:--train.dtype fp32 --train.global_batch 16",
    "tiny:",
]
LAYOUTS = {
    # name: (processes, trainer flags); "1t": one process with OMP_NUM_THREADS=1 (see the docstring)
    "1": (1, []),
    "1t": (1, []),
    "dp2": (2, []),
    "tp2": (2, ["--parallel.tp", "2"]),
    "pp2": (2, ["--parallel.pp", "2"]),
}
LACKS = re.compile(r"unknown (config key|option|argument)|unrecognized arguments|no such option|nproc", re.IGNORECASE)


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))


def calibration_threads(path: Path) -> int | None:
    with open(path, "rb") as f:
        return tomllib.load(f).get("calibration", {}).get("threads")


def calibration_probe(path: Path) -> float | None:
    with open(path, "rb") as f:
        return tomllib.load(f).get("calibration", {}).get("probe_gflops") or None


def probe(threads: int) -> float:
    """The calibration's speed probe with `threads` threads, in this process."""
    import torch

    from scalelm.calibrate import speed_probe_gflops

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return speed_probe_gflops()
    finally:
        torch.set_num_threads(before)


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


def train(preset: str, args: list[str], layout: str, steps: int, workdir: Path) -> dict:
    """Run the trainer; {'step_s', 'dtype', 'threads'} or {'na': reason}."""
    nproc, flags = LAYOUTS[layout]
    out = Path(tempfile.mkdtemp(prefix=f"{preset}-{layout}-", dir=workdir))
    cmd = [sys.executable, "-m", "scalelm", "train", "--model.preset", preset, "--train.steps", str(steps),
           "--train.log_every", str(max(1, steps // 2)), "--metrics.progress", "false", "--train.eval_every", "0",
           "--train.eval_batches", "1", "--train.sample_tokens", "0", "--out", str(out), *args]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), *flags]
    env = _env()
    if layout == "1t":
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True)
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


def predict(preset: str, args: list[str], layout: str, dtype: str, hw_path: Path) -> float:
    """The trainer's own forecast (scalelm.train.forecast) for this run: same config, layout, precision and the
    optimizer `optim.name` resolves to for that layout."""
    nproc, flags = LAYOUTS[layout]
    cfg = build_config({}, parse_overrides(["--model.preset", preset, *args, *flags]))
    return predict_run(cfg, nproc, dtype, load_hardware(str(hw_path)))["step_time_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hardware", type=Path, help="calibrated file for 1-process runs (reused if it exists)")
    p.add_argument("--hardware-1t", type=Path, help="file calibrated with OMP_NUM_THREADS=1, for torchrun ranks")
    p.add_argument("--layouts", default="1", help="comma list of 1, 1t, dp2, tp2, pp2 (default 1)")
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
            one_thread = LAYOUTS[layout][0] > 1 or layout == "1t"
            probe_threads = 1 if one_thread else default_threads
            speed = probe(probe_threads)
            m = train(preset, extra, layout, args.steps, workdir)
            speed = (speed + probe(probe_threads)) / 2
            if "na" in m:
                rows.append([name, layout, "-", "-", "-", m["na"], "-"])
                print(f"  {name} [{layout}]: {m['na']}", flush=True)
                continue
            hw_path = hw1
            if one_thread:
                hw_1t = hw_1t or ensure_hardware(args.hardware_1t, 1, workdir)
                hw_path = hw_1t
            dtype = m["dtype"] or parse_overrides(extra).get("train.dtype", "fp32")
            pred = predict(preset, extra, layout, dtype, hw_path)
            err = 100 * (pred - m["step_s"]) / m["step_s"]
            errors.append(abs(err))
            at_cal = calibration_probe(hw_path)
            drift = f"{100 * (speed / at_cal - 1):+.1f}" if at_cal else "-"
            rows.append([name, layout, f"{m['threads'] or '?'}", f"{pred:.4f}", f"{m['step_s']:.4f}", f"{err:+.1f}",
                         drift])
            print(f"  {name} [{layout}, {dtype}, {m['optimizer']}]: predicted {pred:.4f} s, measured {m['step_s']:.4f} s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (timings on a shared machine "
          "are noisy)\n")
    print(table(["run", "layout", "threads/proc", "predicted step_s", "measured step_s", "error %", "speed vs cal %"],
                rows))
    if errors:
        errors.sort()
        print(f"\nwithin 15%: {sum(e <= 15 for e in errors)}/{len(errors)}; median |error| "
              f"{errors[len(errors) // 2]:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
