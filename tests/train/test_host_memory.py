import platform

import pytest

from scalelm.train.host_memory import keep_freed_host_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_host_memory_applies_once_and_memory_is_reused():
    import resource

    import torch

    assert keep_freed_host_memory() and keep_freed_host_memory()
    for _ in range(8):  # the first rounds grow the heap (a few holes too small for the aligned block)
        torch.ones(64 * 2**20 // 4).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(64 * 2**20 // 4).sum()  # 64 MiB, over any mmap threshold: reused, not faulted in again
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 5 * 64 * 2**20 // 4096 // 4


def test_cpu_peak_is_the_best_backend_and_auto_picks_it(monkeypatch, tmp_path):
    import scalelm.train.peak as peak

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peak, "measure_cpu_matmul_flops",
                        lambda dtype, backend="blas": {"blas": 150e9, "onednn": 200e9}[backend])
    monkeypatch.setattr("scalelm.kernels.cpu.linear.onednn_available", lambda: True)
    assert peak.cpu_matmul_rates("fp32") == {"blas": 150e9, "onednn": 200e9}
    assert peak.cpu_peak_flops("fp32") == 200e9 and peak.fastest_cpu_matmul("fp32") == "onednn"
    assert peak.cpu_matmul_rates("bf16") == {"blas": 150e9}  # bf16 matmuls are PyTorch's own
