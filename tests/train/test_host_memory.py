import platform

import pytest

from scalelm.train.host_memory import keep_freed_host_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_host_memory_applies_once_and_memory_is_reused():
    """A freed 64 MiB block (over any mmap threshold) is reused from the heap, not faulted in again. Called through
    libc itself, so no other allocation lands between the rounds (PyTorch's CPU tensors use the same malloc)."""
    import ctypes
    import ctypes.util
    import resource

    assert keep_freed_host_memory() and keep_freed_host_memory()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.restype, libc.memset.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    size = 64 * 2**20

    def touch_and_free() -> None:
        block = libc.malloc(size)
        assert block
        libc.memset(block, 1, size)
        libc.free(block)

    touch_and_free()  # grows the heap once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        touch_and_free()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < size // 4096 // 4  # < 1/4 of one block


def test_cpu_peak_is_the_best_backend_and_auto_picks_it(monkeypatch, tmp_path):
    import scalelm.train.peak as peak

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peak, "measure_cpu_matmul_flops",
                        lambda dtype, backend="blas": {"blas": 150e9, "onednn": 200e9}[backend])
    monkeypatch.setattr("scalelm.kernels.cpu.linear.onednn_available", lambda: True)
    assert peak.cpu_matmul_rates("fp32") == {"blas": 150e9, "onednn": 200e9}
    assert peak.cpu_peak_flops("fp32") == 200e9 and peak.fastest_cpu_matmul("fp32") == "onednn"
    assert peak.cpu_matmul_rates("bf16") == {"blas": 150e9}  # bf16 matmuls are PyTorch's own
