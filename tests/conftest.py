import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# One thread per test process keeps the suite steady on a 2-core machine (multi-process tests start their own).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The C++ CPU kernels build where PyTorch builds them for the user (its default under the real cache home, keyed
# by the sources), not in each session's isolated cache below: the build is a product artifact, and it takes half
# a minute on two cores.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch_extensions"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep caches (bundled dataset, CPU peak) out of the user's home; shared across the session for speed."""
    cache = tmp_path_factory.getbasetemp() / "xdg-cache"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
