"""bench/gpu_check.py runs on the CPU with --dry-run (the tiny preset, the same checks), so it cannot rot before a
GPU runs it."""

import subprocess
import sys
from pathlib import Path

from launch import env

SCRIPT = Path(__file__).parents[2] / "bench" / "gpu_check.py"


def test_gpu_check_dry_run_passes_every_check():
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], env=env(), capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert len(rows) == 4 and all(row.endswith("| yes |") for row in rows)
    assert "FSDP2 one rank over gloo" in result.stdout
