"""Time of kernels on one device: GEMMs by shape, fused attention, memory-bound elementwise work.

A GEMM is a roofline with a fixed cost (Williams et al. 2009 for the roofline; the fixed cost is the
launch and pipeline ramp, as in Calculon's efficiency curves):

    t = kernel_overhead + max(FLOPs / (peak · clock_derate · eff_mm · k/(k + k0) · n/(n + n0)),  bytes / (HBM · eff_bw))

`eff_mm` is the large-GEMM efficiency of the device (hardware file), `k/(k+k0)` the share of a tile's
time spent in the main loop for inner size k (epilogue and prologue cost ~k0 iterations; small inner
dimensions such as attention's head_dim or a TP-split row-parallel input lose most), `n/(n+n0)` the
same for narrow outputs (a TP-split q, k or v projection; fitted by `scalelm calibrate` on CPUs, 0 on GPUs), and the
memory term covers skinny GEMMs. Wave quantization is modelled too: output tiles of 128x128 are
scheduled in waves over the device's compute units, and the last, partial wave runs at its fill.
"""

from __future__ import annotations

import math

from scalelm.perf.flops import Gemm
from scalelm.perf.hardware import Hardware

FP8_MATMUL_EFFICIENCY = 0.85
"""FP8 GEMMs reach a smaller share of their (doubled) peak than bf16 GEMMs: H100 ~1,300 of 1,979 TFLOP/s
vs ~750 of 989 in NVIDIA Transformer Engine GEMM benchmarks (ratio ~0.85)."""


def _wave_efficiency(m: int, n: int, units: int, tile: int = 128) -> float:
    tiles = math.ceil(m / tile) * math.ceil(n / tile)
    waves = math.ceil(tiles / units)
    return tiles / (waves * units)


def curve_seconds(m: int, n: int, k: int, flops_per_s: float, k0: float, n0: float) -> float:
    """Compute-bound seconds of C[m,n] = A[m,k]·B[k,n] on the GEMM curve: the rate is flops_per_s·k/(k + k0)·n/(n + n0)
    (scalelm calibrate fits peak, k0 and n0 of it, and measures its in-step factors against it)."""
    return 2.0 * m * n * k / (flops_per_s * k / (k + k0) * n / (n + n0))


def gemm_time_s(m: int, n: int, k: int, hw: Hardware, dtype: str = "bf16") -> float:
    """Seconds for C[m,n] = A[m,k]·B[k,n] in `dtype` on one device."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    eff = hw.efficiency
    peak = hw.accelerator.peak_flops(dtype) * eff.clock_derate
    e = eff.matmul * (FP8_MATMUL_EFFICIENCY if dtype == "fp8" else 1.0)
    k0, n0 = eff.matmul_k_overhead, eff.matmul_n_overhead
    if dtype in ("bf16", "fp16"):
        e = e if eff.matmul_bf16 is None else eff.matmul_bf16
        k0 = k0 if eff.matmul_k_overhead_bf16 is None else eff.matmul_k_overhead_bf16
        n0 = n0 if eff.matmul_n_overhead_bf16 is None else eff.matmul_n_overhead_bf16
    e *= _wave_efficiency(m, n, hw.accelerator.compute_units)
    elt = 1 if dtype == "fp8" else (4 if dtype == "fp32" else 2)
    bytes_moved = elt * (m * k + k * n) + 2 * m * n
    t_mem = bytes_moved / (hw.accelerator.hbm_tb_s * 1e12 * eff.memory_bw)
    return eff.kernel_overhead_us * 1e-6 + max(curve_seconds(m, n, k, peak * e, k0, n0), t_mem)


def gemm_fwd_bwd_s(g: Gemm, hw: Hardware, dtype: str) -> tuple[float, float]:
    """Forward, and backward = dgrad [m,k] = dC[m,n]·Bᵀ plus wgrad [k,n] = Aᵀ·dC (inner size m)."""
    fwd = gemm_time_s(g.m, g.n, g.k, hw, dtype)
    bwd = gemm_time_s(g.m, g.k, g.n, hw, dtype) + gemm_time_s(g.k, g.n, g.m, hw, dtype)
    return fwd, bwd


def flash_attention_s(fwd_flops_square: float, causal: float, head_dim: int, hw: Hardware,
                      dtype: str = "bf16", tiles: float = 0.0) -> tuple[float, float]:
    """Fused attention forward and backward seconds.

    The kernel computes `causal` of the full square; its backward recomputes the scores and runs five
    matmuls to the forward's two, 2.5x the forward FLOPs (Dao 2023, FlashAttention-2, sec. 4.1). The
    device's `attention` efficiency applies to fwd+bwd, scaled by head_dim/(head_dim + 32): small heads
    leave the tensor cores starved (FlashAttention-2 paper, Fig. 5-7: head_dim 64 ~ 85% of 128's speed).
    `dtype` is the attention's input precision: bf16 for bf16/fp8 training (fused kernels run in 16 bits),
    fp32 for fp32 training (CPU runs of the `local` hardware, whose attention efficiency is calibrated in fp32).
    `tiles` = sequences × heads × 64-row query blocks, each paying the device's `attention_tile_us` (a third in
    the forward).
    """
    eff = hw.efficiency
    peak = hw.accelerator.peak_flops("fp32" if dtype == "fp32" else "bf16") * eff.clock_derate
    share = eff.attention_bf16 if dtype != "fp32" and eff.attention_bf16 is not None else eff.attention
    e = share * head_dim / (head_dim + 32)
    fwd = fwd_flops_square * causal / (peak * e)
    bf16_tile = dtype != "fp32" and eff.attention_tile_us_bf16 is not None
    tile_s = tiles * (eff.attention_tile_us_bf16 if bf16_tile else eff.attention_tile_us) * 1e-6
    return fwd + tile_s / 3 + eff.kernel_overhead_us * 1e-6, 2.5 * fwd + 2 * tile_s / 3 + 2 * eff.kernel_overhead_us * 1e-6


def memory_bound_s(bytes_moved: float, hw: Hardware) -> float:
    """Elementwise/normalization work: bytes over the HBM bandwidth the kernels reach."""
    return bytes_moved / (hw.accelerator.hbm_tb_s * 1e12 * hw.efficiency.memory_bw)
