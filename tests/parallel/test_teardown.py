"""A finished multi-process run leaves no gloo thread behind: the trainer releases its process groups, and what
torch.distributed itself keeps of them (cached device meshes, default arguments holding the default group),
before Python shuts down (parallel.release_process_groups). A gloo thread that meets interpreter shutdown can
abort a rank after a finished run."""

import sys

import pytest
from launch import BASE, HERE, torchrun

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

LAYOUTS = {
    "tp2": ["--parallel.tp", "2"],
    "fsdp2": ["--parallel.zero", "3"],
    "ddp": ["--parallel.zero", "0"],
    "zero1": ["--parallel.zero", "1"],  # DDP + ZeroRedundancyOptimizer
    "pp2": ["--parallel.pp", "2"],
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads through /proc")
@pytest.mark.parametrize("flags", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_trainer_releases_its_process_groups(tmp_path, flags):
    base = [*BASE[: BASE.index("--train.steps")], "--train.steps", "2"]
    torchrun(2, str(HERE / "teardown_worker.py"), str(tmp_path / "run"), *base, *flags, timeout=180)
