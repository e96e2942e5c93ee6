"""A finished multi-process run leaves no gloo thread behind: the trainer releases its process groups, and the
device meshes that torch.distributed's caches hold, before Python shuts down (parallel.release_process_groups)."""

import sys

import pytest
from launch import BASE, HERE, torchrun

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads through /proc")
@pytest.mark.parametrize("flags", [["--parallel.tp", "2"], ["--parallel.zero", "3"]], ids=["tp2", "fsdp2"])
def test_trainer_releases_its_process_groups(tmp_path, flags):
    base = [*BASE[: BASE.index("--train.steps")], "--train.steps", "2"]
    torchrun(2, str(HERE / "teardown_worker.py"), str(tmp_path / "run"), *base, *flags, timeout=180)
