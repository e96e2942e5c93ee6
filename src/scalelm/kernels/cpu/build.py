"""scalelm's C++ CPU kernels (`csrc/`), built once per machine on first use.

One library holds them all: the fp32 attention kernel (`attention`), RMSNorm's weight gradient (`norm`) and the
few-row matrix-vector product of decode steps (`decode`). It is built by torch.utils.cpp_extension with ninja (the
`scalelm[cpu]` extra) and the machine's C++ compiler for this CPU (`-march=native`), keyed by the sources, the
torch version and the CPU, a few seconds once. Where it cannot be built (no ninja, no compiler), `available()` is
False, one line is logged, and PyTorch's own operators run.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("cpu_attention.cpp", "rms_norm.cpp", "gemv.cpp")]
_loaded: bool | None = None  # None: not tried yet
log = logging.getLogger("scalelm.kernels")


def _cpu_signature() -> str:
    """What the compiled code depends on besides its sources: a build for one CPU must not run on another."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


STALE_LOCK_S = 600.0
"""A build lock older than this belongs to a build that died (a build takes well under a minute)."""


def _remove_stale_lock(name: str) -> None:
    """PyTorch's build lock waits without end for the process holding it; a process killed while building
    leaves it behind, and every later run would hang before its first step. An old lock goes, with one line."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # where load() builds `name`

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (ImportError, OSError):  # no lock (the usual case), or a torch that builds elsewhere
        return
    if age > STALE_LOCK_S:
        log.warning("removing %s, left %.0f s ago by a kernel build that did not finish", lock, age)
        lock.unlink(missing_ok=True)


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing, rather than tracing the build
def available() -> bool:
    """Build (once per machine) and load the kernels; False, with one logged line, where that fails."""
    global _loaded
    if _loaded is None:
        _loaded = False
        try:
            from torch.utils.cpp_extension import load

            key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + torch.__version__.encode()
                                 + _cpu_signature().encode())
            # -fopenmp: at::parallel_for is inline OpenMP code, serial without it; the library links to the libgomp
            # PyTorch has already loaded (same soname), so BLAS inside it knows it runs in a parallel region.
            name = f"scalelm_cpu_kernels_{key.hexdigest()[:16]}"
            _remove_stale_lock(name)
            load(name=name, sources=[str(p) for p in SOURCES],
                 extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                 is_python_module=False, verbose=False)
            _loaded = (hasattr(torch.ops.scalelm_cpu_attention, "forward")
                       and hasattr(torch.ops.scalelm_cpu_norm, "rms_norm_weight_grad")
                       and hasattr(torch.ops.scalelm_cpu_gemv, "gemv"))
        except Exception as e:  # no compiler, no headers, a failed build: PyTorch's operators it is
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            log.warning("scalelm's C++ CPU kernels could not be built (%s: %s); using PyTorch's attention and "
                        "RMSNorm (install the [cpu] extra and a C++ compiler to build them)", type(e).__name__, reason)
    return _loaded
