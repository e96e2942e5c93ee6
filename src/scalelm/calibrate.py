"""`scalelm calibrate`: measure this machine and write a hardware TOML the step model can use.

The only perf module that touches PyTorch, and only inside its functions. It measures, with the thread
count PyTorch uses here (OMP_NUM_THREADS; torchrun sets 1 per process):

* matmul throughput over shapes (median of several calls each): the step model's curve
  peak·k/(k + k0)·n/(n + n0) is fitted to all of them, giving the fp32 (and bf16) "peak", the inner-dimension
  penalty k0 and the narrow-output penalty n0 of compute.gemm_time_s; the fixed cost comes from a tiny matmul; then the forward and backward of a stack of
  linear layers gives the share of that curve GEMMs reach inside a training step (`efficiency.matmul`); where
  the trainer's fp32 oneDNN path is the faster one, a transformer layer's linear layers run through it give its
  speed as a factor on the same curve (`efficiency.matmul_fp32_fast`), and the same layer under bf16 autocast a
  factor on the bf16 curve (`efficiency.matmul_bf16`), both in calibrate_matmul.py;
* host time per eager operator (dispatch + autograd), which a CPU cannot overlap with its own compute;
* memory bandwidth: a large tensor copy (read + write) -> hbm_tb_s with memory_bw efficiency 1.0;
* attention: causal attention forward+backward in fp32 (scalelm's CPU kernel, model/cpu_attention.py) and bf16
  (scaled_dot_product_attention), expressed in the step model's convention (compute.flash_attention_s): an efficiency per dtype and a fixed cost per tile;
* no compute/communication overlap (`comm_overlap = 0`): gloo runs collectives on the compute cores;
* FSDP2's cost per unit beyond its collectives' bytes, and how much slower tensor parallelism's all-reduces
  run inside a step than between idle processes (calibrate_parallel.py);
* collectives: gloo all-reduce and all-gather between 2 local processes (torch.multiprocessing spawn),
  fitted to t = alpha + S/beta -> intra_node_gb_s and latency; gpus_per_node = the processes this machine
  runs side by side.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def _bench(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of `reps` calls: the typical speed, which is what a training run sees on a machine it
    shares (the best call would predict runs faster than they go)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def speed_probe_gflops(reps: int = 9) -> float:
    """fp32 GFLOP/s of a 1024³ matmul (median call) with the current thread count: a one-second measure of how
    fast this machine runs right now. The file records it; bench/calibrate_check.py measures it again before and
    after each run, so a shared machine's drift between calibration and run is visible next to the error."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / _bench(lambda: torch.mm(a, b), reps, warmup=2) / 1e9


def measure_matmul(quick: bool = False, dtype: str = "float32") -> dict:
    import torch

    dt = getattr(torch, dtype)
    big = 512 if quick else 1024
    # Square-ish shapes for the peak and the inner-size curve, then tall narrow-output ones: a TP-split q, k or v
    # projection is [tokens x d]·[d x d/tp], whose few output columns cost CPU BLAS kernels a good part of their speed.
    shapes = [(big, big, big), (2 * big, big, big), (big, 4 * big, big), (big, big, 4 * big),
              (big, big, 64), (big, big, 128), (big, big, 256), (4096, 256, 256),
              (8 * big, 128, 256), (8 * big, 384, 256), (8 * big, 256, 128)]
    reps = 3 if quick else 7
    operands = [(torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)) for m, n, k in shapes]
    warm = torch.randn(big, big, dtype=dt)
    for _ in range(3):  # the BLAS's first calls set up its threads and buffers: not part of any shape's rate
        torch.mm(warm, warm)
    for a, b in operands:
        torch.mm(a, b)
    # Round-robin over the shapes, rep by rep, so a slow minute of a shared machine slows every shape alike
    # instead of bending the fitted curve; the median call of each shape is kept.
    times: list[list[float]] = [[] for _ in shapes]
    for _ in range(reps):
        for (a, b), samples in zip(operands, times):
            samples.append(_bench(lambda a=a, b=b: torch.mm(a, b), 1, warmup=0))
    out = []
    for (m, n, k), samples in zip(shapes, times):
        t = sorted(samples)[len(samples) // 2]
        out.append({"m": m, "n": n, "k": k, "s": t, "tflops": 2 * m * n * k / t / 1e12})
    a, b = torch.randn(8, 8, dtype=dt), torch.randn(8, 8, dtype=dt)
    tiny = _bench(lambda: torch.mm(a, b), 50)
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
    import torch

    n = (32 if quick else 128) * 2**20 // 4
    x = torch.randn(n)
    y = torch.empty_like(x)
    t = _bench(lambda: y.copy_(x), 3 if quick else 5)
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

    t = _bench(chain, 5 if quick else 10, warmup=2)
    return t / (2 * n) * 1e6


def _attention_seconds(b: int, h: int, s: int, d: int, dtype: str, reps: int) -> float:
    """Causal attention forward+backward as the model runs it: in fp32 scalelm's CPU kernel (RoPE inside it)
    where it applies, otherwise scaled_dot_product_attention."""
    import torch
    import torch.nn.functional as F

    from scalelm.model import cpu_attention
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

    return _bench(step, reps)


def measure_attention(peak_tflops: float, quick: bool = False, dtype: str = "float32") -> tuple[float, float]:
    """(efficiency, µs per tile) of causal attention forward+backward in `dtype` (the model's kernel), in the step
    model's terms (compute.flash_attention_s): t = 3.5·causal·4·b·h·s²·d / (peak·e·d/(d+32)) + tiles·c with
    tiles = b·h·ceil(s/64). Two shapes — one FLOP-heavy, one of many small tiles — give the two unknowns."""
    from scalelm.perf.flops import causal_fraction

    reps = 3 if quick else 5
    shapes = [((2 if quick else 8), 4, 256, 64), (64, 4, 64, 16)]
    rows = []
    for b, h, s, d in shapes:
        t = _attention_seconds(b, h, s, d, dtype, reps)
        work = 3.5 * causal_fraction(s) * 4 * b * h * s * s * d / (peak_tflops * 1e12 * d / (d + 32))
        rows.append((work, b * h * -(-s // 64), t))  # t = work/e + tiles·c
    (w1, n1, t1), (w2, n2, t2) = rows
    det = w1 * n2 - w2 * n1
    inv_e, c = (t1 * n2 - t2 * n1) / det, (w1 * t2 - w2 * t1) / det
    if inv_e <= 0 or c < 0:  # noise: attribute everything to throughput, measured on the big shape
        inv_e, c = t1 / w1, 0.0
    # Not capped at 1: the share is of the dtype's matmul peak, and a CPU flash kernel computing bf16 attention
    # in fp32 can outrun bf16 GEMMs (Efficiency.attention_bf16). Capping put the excess into the tile cost.
    return 1.0 / inv_e, c * 1e6


def _collective_worker(rank: int, world: int, port: int, sizes: list[int], queue) -> None:
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
        t = _bench(lambda x=x: dist.all_reduce(x), 5)
        res["all_reduce"].append((size, t))
        outs = [torch.empty(size // 4 // world) for _ in range(world)]
        part = torch.ones(size // 4 // world)
        t = _bench(lambda outs=outs, part=part: dist.all_gather(outs, part), 5)
        res["all_gather"].append((size, t))
    try:
        from scalelm.calibrate_parallel import measure_parallel_overheads

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
        from scalelm.calibrate_parallel import per_unit_overheads

        out["fsdp_unit_us"], out["tp_comm_slowdown"] = per_unit_overheads(
            res["parallel"], lambda size: a_ag + 0.5 * size / b_ag, lambda size: a_ar + size / b_ar)
    return out


def calibrate(quick: bool = False, collectives: bool = True) -> dict:
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
    from scalelm.calibrate_matmul import measure_layer_matmul_factor, measure_step_matmul_efficiency

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mm, coll = result["matmul"], result["collectives"]
    shapes = "; ".join(f"{r['m']}x{r['n']}x{r['k']}: {r['tflops'] * 1e3:.1f} GFLOP/s" for r in mm["shapes"])
    fast = result.get("matmul_fp32_fast")
    factor_lines = f"matmul_fp32_fast = {fast:.4f}\n" if fast else ""
    if result.get("matmul_bf16"):
        factor_lines += f"matmul_bf16 = {result['matmul_bf16']:.4f}\n"
    text = f"""# Written by `scalelm calibrate` on {time.strftime('%Y-%m-%d %H:%M')} ({result['machine']}, torch {result['torch']},
# {result['threads']} threads). Measured values. matmul: the share of their stand-alone speed GEMMs keep
# inside a training step; comm_overlap 0: gloo collectives run on the compute cores, nothing hides behind compute.
# matmul shapes: {shapes}

[accelerator]
key = "local"
name = "this machine: {result['machine']}, {result['threads']} threads"
peak_tflops = {{ fp32 = {mm['peak_tflops']:.6f}, bf16 = {result['bf16_tflops']:.6f} }}
hbm_gib = {result['ram_gib']:.1f}
hbm_tb_s = {result['memory_tb_s']:.6f}
tdp_w = 65.0
compute_units = 1
price_per_hour_usd = 0.05
source = "scalelm calibrate (measured)"
notes = "tdp_w and price are placeholders; edit them for energy and cost estimates"

[efficiency]
matmul = {result.get('matmul_step_efficiency', 1.0):.4f}
{factor_lines}matmul_k_overhead = {mm['k_overhead']:.1f}
matmul_n_overhead = {mm.get('n_overhead', 0.0):.1f}
matmul_k_overhead_bf16 = {result.get('bf16_k_overhead', mm['k_overhead']):.1f}
matmul_n_overhead_bf16 = {result.get('bf16_n_overhead', mm.get('n_overhead', 0.0)):.1f}
memory_bw = 1.0
attention = {result['attention']:.4f}
attention_bf16 = {result.get('attention_bf16', result['attention']):.4f}
attention_tile_us = {result.get('attention_tile_us', 0.0):.2f}
attention_tile_us_bf16 = {result.get('attention_tile_us_bf16', 0.0):.2f}
comm_overlap = 0.0
clock_derate = 1.0
kernel_overhead_us = {mm['kernel_overhead_us']:.2f}
host_op_us = {result.get('host_op_us', 0.0):.2f}
fsdp_unit_us = {coll.get('fsdp_unit_us', 0.0):.1f}
tp_comm_slowdown = {coll.get('tp_comm_slowdown', 1.0):.3f}
source = "measured by scalelm calibrate"

[node]
gpus_per_node = {max(2, result['cpus'])}
nvlink_domain = {max(2, result['cpus'])}
intra_node_gb_s = {coll['bandwidth_gb_s']:.4f}
intra_node_fabric = "gloo over shared memory/loopback (measured, 2 processes)"
intra_node_efficiency = 1.0
intra_node_latency_us = {coll['latency_us']:.1f}
inter_node = "ethernet-10g"

[calibration]
# How this file was measured; predictions are valid for runs with the same threads per process.
threads = {result['threads']}
cpus = {result['cpus']}
probe_gflops = {result.get('probe_gflops', 0.0):.1f}  # speed_probe_gflops(), mean of the start and the end
torch = "{result['torch']}"
"""
    path.write_text(text)
    return path
