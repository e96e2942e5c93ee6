"""Keep freed host memory inside the process, so a CPU training step does not page-fault its activations back in.

PyTorch allocates CPU tensors with the system malloc. glibc serves large blocks (over a threshold that starts at
128 KiB and adapts up to 32 MiB) with fresh mmaps and hands free memory at the top of its heap back to the OS, so a
training step returns its activations at the end of the backward and faults them in again, zero-filled page by page,
in the next forward: tens of thousands of page faults per step, which slow a CPU step down
(docs/benchmarks.md#training-throughput-and-cpu-kernels).

GPUs avoid this with the CUDA caching allocator; CPU training guides preload jemalloc or tcmalloc. Two `mallopt`
calls give the same effect for glibc with no preload and no new dependency: no mmap for tensors, no trimming.
The price is that the process keeps its peak heap until it exits, which a training process reaches every step anyway.

Ranks that shard a model to fit it make the opposite choice (`return_freed_host_memory`): memory over speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

_applied = False


def _glibc_mallopt():
    """glibc's mallopt(param, value), or None where the C library is not glibc (macOS, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_freed_host_memory() -> bool:
    """Make glibc keep freed memory for reuse (no mmap per large tensor, no trim); True if it is in effect.

    A no-op returning False where the C library is not glibc (macOS, musl): there the system allocator stays as is.
    """
    global _applied
    if _applied:
        return True
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    # No mmap at all: every block comes from the heap, where a freed one is found again by the next step. glibc still
    # falls back to mmap when the heap cannot grow, so this cannot fail an allocation that would otherwise succeed.
    # Trim only beyond 2 GiB free at the top of the heap (the largest value mallopt takes).
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def return_freed_host_memory(threshold_bytes: int = 1 << 20) -> bool:
    """The opposite choice, for ranks that shard a model to fit it: every block of `threshold_bytes` or more is its
    own mmap, handed back to the OS when freed, so resident memory follows the live tensors. glibc's adaptive
    threshold (up to 32 MiB) otherwise serves the many mid-sized tensors of FSDP's gathers and gradient reductions
    from the heap, where freed pieces of different sizes fragment it and the peak grows (bench/memory.py). True if
    it is in effect; False where the C library is not glibc."""
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
