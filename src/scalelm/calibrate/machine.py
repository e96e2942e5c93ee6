"""`scalelm calibrate`: measure this machine and write a hardware TOML the step model (`scalelm.perf`) reads.

Everything is measured with the thread count PyTorch uses here (OMP_NUM_THREADS; torchrun sets 1 per process),
since that is what a training run gets, and reported as the median call (calibrate.timing):

* matmul throughput over shapes, fitted to the step model's curve peak·k/(k + k0)·n/(n + n0) (compute.gemm_time_s)
  per dtype; the fixed cost per kernel from a tiny matmul; the in-step factors on that curve (calibrate.matmul);
* host time per eager operator (dispatch + autograd), which a CPU cannot overlap with its own compute;
* memory bandwidth from a large tensor copy (read + write), so `memory_bw` efficiency is 1.0;
* causal attention forward+backward in fp32 (scalelm's kernel) and bf16, as an efficiency and a cost per tile
  (compute.flash_attention_s);
* gloo all-reduce and all-gather between 2 local processes, fitted to t = alpha + S/beta, and FSDP's and TP's
  costs beyond their bytes (calibrate.parallel). `comm_overlap = 0`: gloo runs collectives on the compute cores.

PyTorch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from statistics import median

from scalelm.calibrate.matmul import measure_layer_matmul_factor, measure_step_matmul_efficiency
from scalelm.calibrate.parallel import measure_parallel_overheads, per_unit_overheads
from scalelm.calibrate.timing import interleaved_s, median_s


def speed_probe_gflops(seconds: float = 0.5) -> float:
    """fp32 GFLOP/s of a 1024³ matmul (median call) with the current thread count: a short measure of how fast
    this machine runs right now. The file records it; bench/calibrate_check.py measures it again around each run,
    so a shared machine's drift between calibration and run shows next to the prediction's error."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / median_s(lambda: torch.mm(a, b), seconds) / 1e9


def measure_matmul(quick: bool = False, dtype: str = "float32") -> dict:
    """Median seconds of torch.mm over square-ish and narrow-output shapes in `dtype`, the curve fitted to them
    (fit_gemm_curve: peak, k0, n0) and the fixed cost of a kernel (a tiny 8×8 matmul, in µs)."""
    import torch

    dt = getattr(torch, dtype)
    big = 512 if quick else 1024
    # Square-ish shapes for the peak and the inner-size curve, then tall narrow-output ones: a TP-split q, k or v
    # projection is [tokens x d]·[d x d/tp], whose few output columns cost CPU BLAS kernels a good part of their speed.
    shapes = [(big, big, big), (2 * big, big, big), (big, 4 * big, big), (big, big, 4 * big),
              (big, big, 64), (big, big, 128), (big, big, 256), (4096, 256, 256),
              (8 * big, 128, 256), (8 * big, 384, 256), (8 * big, 256, 128)]
    operands = [(torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)) for m, n, k in shapes]
    # The shapes in rounds, so a slow minute of a shared machine slows every shape alike instead of bending the
    # fitted curve; the median call of each shape is kept.
    times = interleaved_s([lambda a=a, b=b: torch.mm(a, b) for a, b in operands], 3 if quick else 7)
    out = []
    for (m, n, k), samples in zip(shapes, times):
        t = median(samples)
        out.append({"m": m, "n": n, "k": k, "s": t, "tflops": 2 * m * n * k / t / 1e12})
    a, b = torch.randn(8, 8, dtype=dt), torch.randn(8, 8, dtype=dt)
    tiny = median_s(lambda: torch.mm(a, b), 0.05)
    peak, k0, n0 = fit_gemm_curve(out)
    return {"peak_tflops": peak, "k_overhead": k0, "n_overhead": n0, "kernel_overhead_us": tiny * 1e6, "shapes": out}


def fit_gemm_curve(shapes: list[dict]) -> tuple[float, float, float]:
    """(peak TFLOP/s, k0, n0) of the step model's GEMM curve rate = peak·k/(k + k0)·n/(n + n0), fitted to every
    measured shape at once rather than to the single fastest one, which on a shared machine is as much luck as
    hardware. To first order 1/rate = (1 + k0/k + n0/n)/peak, a plane in (1/k, 1/n): least squares. An overhead
    the data make negative is dropped and the rest refitted; with no usable trend, the median rate and none."""
    import numpy as np

    inv_rate = np.array([1.0 / r["tflops"] for r in shapes])
    columns = {"k": np.array([1.0 / r["k"] for r in shapes]), "n": np.array([1.0 / r["n"] for r in shapes])}
    for used in (("k", "n"), ("k",), ("n",)):
        design = np.column_stack([np.ones(len(shapes))] + [columns[c] for c in used])
        coef = np.linalg.lstsq(design, inv_rate, rcond=None)[0]
        if coef[0] > 0 and all(c >= 0 for c in coef[1:]):
            overhead = dict(zip(used, (float(c / coef[0]) for c in coef[1:])))
            return 1.0 / float(coef[0]), overhead.get("k", 0.0), overhead.get("n", 0.0)
    return float(np.median([r["tflops"] for r in shapes])), 0.0, 0.0


def measure_memory_bw(quick: bool = False) -> float:
    """TB/s of a large fp32 tensor copy, bytes read plus bytes written: what elementwise kernels stream at."""
    import torch

    n = (32 if quick else 128) * 2**20 // 4
    x = torch.randn(n)
    y = torch.empty_like(x)
    t = median_s(lambda: y.copy_(x), 0.1 if quick else 0.3)
    return 2 * n * 4 / t / 1e12  # TB/s read+write


def measure_host_op_us(quick: bool = False) -> float:
    """Host seconds per eager operator with autograd: a chain of n tiny multiplies, forward and backward
    (n forward ops, n backward ops), so the arithmetic is negligible and dispatch is what is timed."""
    import torch

    n = 100
    x = torch.randn(16, requires_grad=True)

    def chain():
        y = x
        for _ in range(n):
            y = y * 1.0001
        y.sum().backward()

    t = median_s(chain, 0.1 if quick else 0.3)
    return t / (2 * n) * 1e6


def _attention_seconds(b: int, h: int, s: int, d: int, dtype: str, min_run_time: float) -> float:
    """Causal attention forward+backward as the model runs it: in fp32 scalelm's CPU kernel (RoPE inside it)
    where it applies, otherwise scaled_dot_product_attention."""
    import torch
    import torch.nn.functional as F

    from scalelm.kernels.cpu import attention as cpu_attention
    from scalelm.model.gpt import rope_tables

    dt = getattr(torch, dtype)
    if dt == torch.float32 and cpu_attention.use_kernel(torch.empty(b, s, h, d), h, h, 0.0):
        qkv = torch.randn(b, s, 3 * h, d, requires_grad=True)
        rope = tuple(t[:s] for t in rope_tables(d, s, 10000.0))

        def step():
            cpu_attention.attention(qkv, h, rope).sum().backward()
    else:
        q, k, v = (torch.randn(b, h, s, d, dtype=dt, requires_grad=True) for _ in range(3))

        def step():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y.sum().backward()

    return median_s(step, min_run_time)


def measure_attention(peak_tflops: float, quick: bool = False, dtype: str = "float32") -> tuple[float, float]:
    """(efficiency, µs per tile) of causal attention forward+backward in `dtype` (the model's kernel), in the step
    model's terms (compute.flash_attention_s): t = 3.5·causal·4·b·h·s²·d / (peak·e·d/(d+32)) + tiles·c with
    tiles = b·h·ceil(s/64). Two shapes — one FLOP-heavy, one of many small tiles — give the two unknowns."""
    from scalelm.perf.flops import causal_fraction

    seconds = 0.2 if quick else 0.5
    shapes = [((2 if quick else 8), 4, 256, 64), (64, 4, 64, 16)]
    rows = []
    for b, h, s, d in shapes:
        t = _attention_seconds(b, h, s, d, dtype, seconds)
        work = 3.5 * causal_fraction(s) * 4 * b * h * s * s * d / (peak_tflops * 1e12 * d / (d + 32))
        rows.append((work, b * h * -(-s // 64), t))  # t = work/e + tiles·c
    (w1, n1, t1), (w2, n2, t2) = rows
    det = w1 * n2 - w2 * n1
    inv_e, c = (t1 * n2 - t2 * n1) / det, (w1 * t2 - w2 * t1) / det
    if inv_e <= 0 or c < 0:  # noise: attribute everything to throughput, measured on the big shape
        inv_e, c = t1 / w1, 0.0
    # Not capped at 1: the share is of the dtype's matmul peak, and a CPU flash kernel computing bf16 attention
    # in fp32 can outrun bf16 GEMMs (Efficiency.attention_bf16); a cap would push the excess into the tile cost.
    return 1.0 / inv_e, c * 1e6


def _collective_worker(rank: int, world: int, port: int, sizes: list[int], queue) -> None:
    """One of measure_collectives' processes, 1 thread each; rank 0 puts the timings on `queue`."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from scalelm.train.host_memory import keep_freed_host_memory

    keep_freed_host_memory()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = {"all_reduce": [], "all_gather": []}
    for size in sizes:
        x = torch.ones(size // 4)
        outs = [torch.empty(size // 4 // world) for _ in range(world)]
        part = torch.ones(size // 4 // world)
        # A fixed number of calls (interleaved_s), so both ranks issue the same collectives.
        reduce_s, gather_s = interleaved_s([lambda x=x: dist.all_reduce(x),
                                            lambda outs=outs, part=part: dist.all_gather(outs, part)], 5)
        res["all_reduce"].append((size, median(reduce_s)))
        res["all_gather"].append((size, median(gather_s)))
    try:
        res["parallel"] = measure_parallel_overheads(world)
    except Exception as exc:  # FSDP2/DTensor missing or failing here: no overhead terms, say why
        res["parallel_error"] = f"{type(exc).__name__}: {exc}"
    if rank == 0:
        queue.put(res)
    dist.barrier()
    from scalelm.parallel import release_process_groups

    release_process_groups()


def _fit_alpha_beta(points: list[tuple[int, float]], volume: float) -> tuple[float, float]:
    """Least squares t = alpha + volume·S/beta; returns (alpha_s, beta_bytes_s)."""
    xs = [volume * s for s, _ in points]
    ys = [t for _, t in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs) or 1.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    alpha = max(0.0, my - slope * mx)
    return alpha, (1.0 / slope if slope > 0 else 1e12)


def measure_collectives(quick: bool = False) -> dict:
    """gloo all-reduce and all-gather between 2 spawned local processes, fitted to t = alpha + S/beta (latency,
    bandwidth), and FSDP's and TP's costs beyond their bytes measured in the same processes (calibrate.parallel)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sizes = [2**p for p in ((12, 18, 22) if quick else (12, 16, 20, 22, 24))]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_collective_worker, args=(2, port, sizes, queue), nprocs=2, join=True, start_method="spawn")
    res = queue.get(timeout=60)
    # n = 2: ring all-reduce moves 2(n-1)/n·S = S, all-gather (n-1)/n·S = S/2, with 2(n-1) = 2 latency steps.
    a_ar, b_ar = _fit_alpha_beta(res["all_reduce"], 1.0)
    a_ag, b_ag = _fit_alpha_beta(res["all_gather"], 0.5)
    out = {"all_reduce": res["all_reduce"], "all_gather": res["all_gather"],
           "latency_us": 1e6 * min(a_ar / 2, a_ag), "bandwidth_gb_s": min(b_ar, b_ag) / 1e9}
    if "parallel" in res:
        out["fsdp_unit_us"], out["tp_comm_slowdown"] = per_unit_overheads(
            res["parallel"], lambda size: a_ag + 0.5 * size / b_ag, lambda size: a_ar + size / b_ar)
    return out


def calibrate(quick: bool = False, collectives: bool = True) -> dict:
    """Everything the hardware file holds (the module docstring lists it), as the dict `write_toml` writes.
    `quick`: smaller shapes and shorter timings; `collectives=False` skips the 2-process measurement and leaves
    placeholder link values (50 µs, 5 GB/s)."""
    import torch

    from scalelm.train.host_memory import keep_freed_host_memory

    keep_freed_host_memory()  # measure under the trainer's allocator setting (train.keep_host_memory)
    probe_before = speed_probe_gflops()
    mm = measure_matmul(quick)
    try:
        mm_bf16 = measure_matmul(quick, "bfloat16")
    except RuntimeError:
        mm_bf16 = mm
    bf16 = mm_bf16["peak_tflops"]
    bw = measure_memory_bw(quick)
    attn, tile_us = measure_attention(mm["peak_tflops"], quick)
    try:
        attn_bf16, tile_us_bf16 = measure_attention(bf16, quick, "bfloat16")
    except RuntimeError:
        attn_bf16, tile_us_bf16 = attn, tile_us
    step_eff = measure_step_matmul_efficiency(quick)
    from scalelm.train.peak import fastest_cpu_matmul

    fast = (measure_layer_matmul_factor(mm["peak_tflops"], mm["k_overhead"], mm["n_overhead"], "onednn", quick)
            if fastest_cpu_matmul("fp32") == "onednn" else None)
    try:
        in_step_bf16 = measure_layer_matmul_factor(bf16, mm_bf16["k_overhead"], mm_bf16.get("n_overhead", 0.0),
                                                   "bf16", quick)
    except RuntimeError:
        in_step_bf16 = None
    host_op_us = measure_host_op_us(quick)
    coll = measure_collectives(quick) if collectives else {"latency_us": 50.0, "bandwidth_gb_s": 5.0}
    try:
        ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram_gib = 16.0
    return {"matmul": mm, "bf16_tflops": bf16, "bf16_k_overhead": mm_bf16["k_overhead"],
            "bf16_n_overhead": mm_bf16.get("n_overhead", 0.0), "memory_tb_s": bw, "attention": attn, "attention_bf16": attn_bf16, "attention_tile_us": tile_us, "attention_tile_us_bf16": tile_us_bf16,
            "matmul_step_efficiency": step_eff, "matmul_fp32_fast": fast, "matmul_bf16": in_step_bf16, "host_op_us": host_op_us,
            "collectives": coll,
            "ram_gib": ram_gib, "probe_gflops": (probe_before + speed_probe_gflops()) / 2, "threads": torch.get_num_threads(), "cpus": os.cpu_count() or 1,
            "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)",
            "torch": torch.__version__}


def write_toml(result: dict, path: str | Path) -> Path:
    """Write `calibrate`'s result as a hardware file (`scalelm.perf.hardware.load_hardware` reads it): tables
    accelerator, efficiency, node and calibration, dumped by tomli_w under a comment header that says how and
    where it was measured (tomli_w writes no comments)."""
    import tomli_w

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mm, coll = result["matmul"], result["collectives"]
    k0, n0 = mm["k_overhead"], mm.get("n_overhead", 0.0)
    efficiency = {"matmul": round(result.get("matmul_step_efficiency", 1.0), 4)}
    if result.get("matmul_fp32_fast"):
        efficiency["matmul_fp32_fast"] = round(result["matmul_fp32_fast"], 4)
    if result.get("matmul_bf16"):
        efficiency["matmul_bf16"] = round(result["matmul_bf16"], 4)
    efficiency.update({
        "matmul_k_overhead": round(k0, 1),
        "matmul_n_overhead": round(n0, 1),
        "matmul_k_overhead_bf16": round(result.get("bf16_k_overhead", k0), 1),
        "matmul_n_overhead_bf16": round(result.get("bf16_n_overhead", n0), 1),
        "memory_bw": 1.0,
        "attention": round(result["attention"], 4),
        "attention_bf16": round(result.get("attention_bf16", result["attention"]), 4),
        "attention_tile_us": round(result.get("attention_tile_us", 0.0), 2),
        "attention_tile_us_bf16": round(result.get("attention_tile_us_bf16", 0.0), 2),
        "comm_overlap": 0.0,
        "clock_derate": 1.0,
        "kernel_overhead_us": round(mm["kernel_overhead_us"], 2),
        "host_op_us": round(result.get("host_op_us", 0.0), 2),
        "fsdp_unit_us": round(coll.get("fsdp_unit_us", 0.0), 1),
        "tp_comm_slowdown": round(coll.get("tp_comm_slowdown", 1.0), 3),
        "source": "measured by scalelm calibrate",
    })
    processes = max(2, result["cpus"])
    doc = {
        "accelerator": {
            "key": "local",
            "name": f"this machine: {result['machine']}, {result['threads']} threads",
            "peak_tflops": {"fp32": round(mm["peak_tflops"], 6), "bf16": round(result["bf16_tflops"], 6)},
            "hbm_gib": round(result["ram_gib"], 1),
            "hbm_tb_s": round(result["memory_tb_s"], 6),
            "tdp_w": 65.0,
            "compute_units": 1,
            "price_per_hour_usd": 0.05,
            "source": "scalelm calibrate (measured)",
            "notes": "tdp_w and price are placeholders; edit them for energy and cost estimates",
        },
        "efficiency": efficiency,
        "node": {
            "gpus_per_node": processes,
            "nvlink_domain": processes,
            "intra_node_gb_s": round(coll["bandwidth_gb_s"], 4),
            "intra_node_fabric": "gloo over shared memory/loopback (measured, 2 processes)",
            "intra_node_efficiency": 1.0,
            "intra_node_latency_us": round(coll["latency_us"], 1),
            "inter_node": "ethernet-10g",
        },
        "calibration": {
            "threads": result["threads"],
            "cpus": result["cpus"],
            "probe_gflops": round(result.get("probe_gflops", 0.0), 1),
            "torch": result["torch"],
        },
    }
    shapes = "; ".join(f"{r['m']}x{r['n']}x{r['k']}: {r['tflops'] * 1e3:.1f} GFLOP/s" for r in mm["shapes"])
    header = (
        f"# Written by `scalelm calibrate` on {time.strftime('%Y-%m-%d %H:%M')} ({result['machine']}, "
        f"torch {result['torch']},\n"
        f"# {result['threads']} threads). Measured values. efficiency.matmul: the share of their stand-alone speed GEMMs keep\n"
        "# inside a training step; comm_overlap 0: gloo collectives run on the compute cores, nothing hides behind compute.\n"
        "# [calibration]: how this file was measured; predictions are valid for runs with the same threads per process.\n"
        "# probe_gflops: speed_probe_gflops(), the mean of the calibration's start and end.\n"
        f"# matmul shapes: {shapes}\n\n"
    )
    path.write_text(header + tomli_w.dumps(doc))
    return path
