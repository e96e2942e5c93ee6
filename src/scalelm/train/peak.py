"""Peak FLOP/s of the device the run uses, for MFU = flops_per_token × tokens/s / peak.

GPUs: dense tensor-core peaks from vendor data sheets, matched by device name. CPUs have no data sheet figure
that means anything here, so the peak is *measured* once — the best large square matmul rate of any GEMM backend
this PyTorch build has (BLAS and, for fp32, oneDNN) — and cached per CPU model, thread count, dtype and torch
version. An unknown GPU gives None: we never guess a peak.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

# Dense peak TFLOP/s (bf16/fp16 tensor cores, tf32, fp32 non-tensor) by name fragment, most specific first.
GPU_PEAKS_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.5, "fp16": 989.5, "fp32": 67.0, "tf32": 494.7}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0, "tf32": 378.0}),
    ("H100", {"bf16": 989.5, "fp16": 989.5, "fp32": 67.0, "tf32": 494.7}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tf32": 156.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0, "tf32": 1100.0}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6, "tf32": 183.0}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("MI300X", {"bf16": 1307.4, "fp16": 1307.4, "fp32": 163.4, "tf32": 653.7}),
]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "scalelm"


def gpu_peak_flops(device_name: str, dtype: str) -> float | None:
    for fragment, peaks in GPU_PEAKS_TFLOPS:
        if fragment.lower() in device_name.lower():
            value = peaks.get(dtype)
            return value * 1e12 if value else None
    return None


def measure_cpu_matmul_flops(dtype: torch.dtype = torch.float32, seconds_per_size: float = 0.4,
                             backend: str = "blas", sizes: tuple[int, ...] = (512, 1024, 1536, 2048)) -> float:
    """Best matmul FLOP/s over square `sizes` with the current thread count, through `backend` ("blas": torch.mm;
    "onednn": the kernel scalelm.kernels.cpu.linear routes fp32 linear layers to). Each size runs for about
    `seconds_per_size` under torch.utils.benchmark.Timer (blocked_autorange, its first calls a warm-up) and gives
    its median call; the fastest size gives the peak. Sizes stop growing once one call outlasts the budget."""
    from torch.utils.benchmark import Timer

    from scalelm.kernels.cpu.linear import onednn_mm_nt

    matmul = torch.mm if backend == "blas" else onednn_mm_nt  # (a · bᵀ for onednn: the same FLOPs)
    best = 0.0
    gen = torch.Generator().manual_seed(0)  # not the global RNG: a run that measures must train as one that read the cache
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, generator=gen), torch.randn(n, n, dtype=dtype, generator=gen)
        timer = Timer("matmul(a, b)", globals={"matmul": matmul, "a": a, "b": b}, num_threads=torch.get_num_threads())
        call_s = timer.blocked_autorange(min_run_time=seconds_per_size).median
        best = max(best, 2 * n**3 / call_s)
        if call_s > seconds_per_size:  # a CPU this slow in this dtype (bf16 without bf16 units) gains nothing
            break  # from bigger sizes, and each would take 3.4x longer again
    return best


def cpu_matmul_rates(dtype: str = "fp32", refresh: bool = False) -> dict[str, float]:
    """Measured square-matmul FLOP/s per CPU backend this build has for `dtype`, cached in the user cache directory.

    fp32 has two: PyTorch's BLAS and oneDNN (see scalelm.kernels.cpu.linear); other dtypes go through torch.mm alone
    (PyTorch already sends CPU bf16 matmuls to oneDNN)."""
    from scalelm.kernels.cpu.linear import onednn_available

    backends = ["blas"] + (["onednn"] if dtype == "fp32" and onednn_available() else [])
    base = f"{platform.processor() or platform.machine()}|{_cpu_model()}|threads={torch.get_num_threads()}|{dtype}|torch={torch.__version__}"
    path = _cache_dir() / "cpu_peak.json"
    cache: dict[str, float] = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
    keys = {backend: f"{base}|{backend}" for backend in backends}
    if refresh or any(key not in cache for key in keys.values()):
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        for backend, key in keys.items():
            cache[key] = measure_cpu_matmul_flops(torch_dtype, backend=backend)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home only costs a re-measurement next time
    return {backend: cache[key] for backend, key in keys.items()}


def cpu_peak_flops(dtype: str = "fp32", refresh: bool = False) -> float:
    """The CPU's matmul peak for `dtype`: the best rate of any backend (a GEMM may never run faster than the peak)."""
    return max(cpu_matmul_rates(dtype, refresh).values())


def fastest_cpu_matmul(dtype: str = "fp32") -> str:
    """The backend with the higher measured fp32 matmul rate on this CPU: what cpu.matmul = auto picks."""
    rates = cpu_matmul_rates(dtype)
    return max(rates, key=rates.get)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown-cpu"


def peak_flops(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s or None, a note saying where it came from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype)
        if peak is None:
            return None, f"no peak known for {name!r} ({dtype}); mfu is null"
        return peak, f"{name} {dtype} data-sheet peak {peak / 1e12:.0f} TFLOP/s"
    if device.type == "cpu":
        peak = cpu_peak_flops(dtype)
        return peak, f"CPU {dtype} matmul peak measured at {peak / 1e9:.0f} GFLOP/s ({torch.get_num_threads()} threads)"
    return None, f"no peak known for device type {device.type!r}; mfu is null"
