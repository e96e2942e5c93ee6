"""Acceptance 3: time `scalelm plan` for GPT-3 175B on 1024 A100-80GB (must be <= 2 s on a 2-core machine).

Run: python bench/plan_speed.py   (prints a table; results in docs/benchmarks.md#plan-speed)
"""

from __future__ import annotations

import subprocess
import sys
import time

ARGV = ["--model", "gpt3-175b", "--gpu", "a100-80gb", "--gpus", "1024", "--seq", "2048", "--global-batch", "1536"]
CASES = [ARGV,
         ["--model", "llama3-405b", "--gpu", "h100-sxm-80gb", "--gpus", "4096", "--seq", "8192", "--global-batch", "2048"],
         ["--model", "llama3-8b", "--gpu", "h100-sxm-80gb", "--gpus", "64", "--seq", "8192", "--global-batch", "512"]]


def main() -> None:
    print(f"{'command':<100} {'wall_s':>7} {'in-process_s':>12}")
    for argv in CASES:
        code = f"from scalelm.perf.cli import main_plan; raise SystemExit(main_plan({argv!r}))"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        wall = time.perf_counter() - t
        import contextlib
        import io

        from scalelm.perf.cli import main_plan

        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            main_plan(argv)
        inproc = time.perf_counter() - t
        print(f"{'scalelm plan ' + ' '.join(argv):<100} {wall:7.2f} {inproc:12.2f}")


if __name__ == "__main__":
    main()
