"""Training throughput and MFU of a model on the current device, plain PyTorch and with the CPU kernels applied.

    python bench/train_throughput.py                  # shakespeare-char, compiled; fp32 and the default dtype;
                                                      # plain PyTorch and with scalelm.kernels.cpu applied
    python bench/train_throughput.py --preset tiny --dtype fp32 --compile 0 --kernels cpu

"Plain" is the model as `scalelm.model.gpt` builds it on PyTorch's own operators and BLAS; "cpu" is the same
model after `apply_cpu_kernels(model, matmul=<the faster GEMM backend here>)`, as the trainer runs a CPU job.
The default dtype is what `train.dtype = auto` picks on this machine.

MFU = flops_per_token × tokens/s / peak, where the peak is the device's: a data-sheet figure on known GPUs, the
measured best square-matmul rate of the same dtype on a CPU over every GEMM backend it has (scalelm.train.peak: for
fp32, PyTorch's BLAS and oneDNN, whichever is faster, also when the model runs the other one). Each row times full optimizer
steps (forward, backward, clip, AdamW) after warm-up steps, and reports the median.

MFU/mm divides by the peak of torch.mm alone (for fp32, the BLAS), the convention of a plain PyTorch
setup; where oneDNN is faster (scalelm.kernels.cpu.linear) the MFU column's peak is higher than that one.

On a CPU the peak is measured again in this process, just before and just after each row, and the higher of the
two is used (`--peak cached` uses the trainer's cached figure instead): a shared VM's speed drifts by tens of
percent between minutes, so a peak measured at another time would say more about the neighbours than the model.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from scalelm.kernels.cpu import apply_cpu_kernels
from scalelm.model import get_preset
from scalelm.model.gpt import GPT
from scalelm.train.host_memory import keep_freed_host_memory
from scalelm.train.peak import cpu_matmul_rates, fastest_cpu_matmul, gpu_peak_flops
from scalelm.train.precision import resolve_precision


def measure(preset: str, dtype: str, compiled: bool, batch: int, seq: int, steps: int, device: str,
            fresh_peak: bool, compile_mode: str = "default", cpu_matmul: str | None = None) -> dict:
    """One row: median step of `preset` in `dtype`; with cpu_matmul ("blas"/"onednn") the CPU kernels applied."""
    torch.manual_seed(0)
    cfg = get_preset(preset)
    model = GPT(cfg).to(device)
    if cpu_matmul is not None:
        apply_cpu_kernels(model, matmul=cpu_matmul)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model, mode=None if compile_mode == "default" else compile_mode) if compiled else model
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    rates_before = cpu_matmul_rates(dtype, refresh=True) if device == "cpu" and fresh_peak else None
    times, faults = [], 0
    for i in range(steps + 3):
        if i == 3:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        with amp:
            logits = fwd(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # warm-up (and compilation) excluded
            times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    step_s = statistics.median(times)
    tokens_per_s = batch * seq / step_s
    blas_peak = None
    if device == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name(), dtype)
    else:
        rates = cpu_matmul_rates(dtype, refresh=fresh_peak)
        if fresh_peak:
            rates = {backend: max(rate, rates_before[backend]) for backend, rate in rates.items()}
        peak, blas_peak = max(rates.values()), rates["blas"]
    flops = model.flops_per_token(seq) * tokens_per_s
    return {"preset": preset, "dtype": dtype, "compile": compiled, "batch": batch, "seq": seq,
            "kernels": "plain" if cpu_matmul is None else f"cpu ({cpu_matmul})",
            "tokens_per_s": tokens_per_s, "gflops": flops / 1e9, "peak_gflops": peak / 1e9 if peak else None,
            "faults_per_step": faults, "mfu": flops / peak if peak else None, "mfu_blas": flops / blas_peak if blas_peak else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--dtype", default="fp32,auto",
                   help="comma-separated: fp32, bf16, auto (= what train.dtype=auto picks here); default fp32,auto")
    p.add_argument("--compile", choices=["0", "1", "both"], default="1")
    p.add_argument("--kernels", choices=["plain", "cpu", "both"], default="both",
                   help="plain PyTorch, the CPU kernels applied (CPU only), or both")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=0, help="0 = the model's max_seq_len")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--compile-mode", default="default", choices=["default", "max-autotune"],
                   help="torch.compile mode; max-autotune also times Inductor's GEMM templates against ATen's")
    p.add_argument("--peak", choices=["fresh", "cached"], default="fresh",
                   help="CPU: measure the matmul peak around each row (fresh) or use the cached figure")
    p.add_argument("--host-memory", choices=["keep", "system"], default="keep",
                   help="CPU: keep freed memory in the process as the trainer does (cpu.keep_host_memory), or "
                        "leave glibc's default, which returns it to the OS and page-faults it back every step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    kept = args.device == "cpu" and args.host_memory == "keep" and keep_freed_host_memory()
    dtypes: list[str] = []
    for name in args.dtype.split(","):
        if name not in ("fp32", "bf16", "auto"):
            p.error(f"--dtype: {name!r} is not one of fp32, bf16, auto")
        name = resolve_precision(name, torch.device(args.device)).name if name == "auto" else name
        dtypes += [name] if name not in dtypes else []
    kernels = ["plain", "cpu"] if args.kernels == "both" else [args.kernels]
    if args.device != "cpu":
        kernels = ["plain"]  # the CPU kernels never run on a GPU
    matmul = fastest_cpu_matmul("fp32") if args.device == "cpu" else None  # as the trainer's cpu.matmul = auto
    seq = args.seq or get_preset(args.preset).max_seq_len
    compiles = [False, True] if args.compile == "both" else [args.compile == "1"]
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"host memory {'kept' if kept else 'system allocator'}, CPU kernels' fp32 matmul {matmul}")
    print(f"{'preset':18} {'dtype':5} {'compile':7} {'kernels':13} {'batch×seq':>10} {'tokens/s':>10} {'GFLOP/s':>8} "
          f"{'peak':>8} {'MFU':>6} {'mm peak':>8} {'MFU/mm':>7} {'faults/step':>11}")
    for dtype in dtypes:
        for compiled in compiles:
            for kind in kernels:
                r = measure(args.preset, dtype, compiled, args.batch, seq, args.steps, args.device,
                            args.peak == "fresh", args.compile_mode, matmul if kind == "cpu" else None)
                mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
                peak = f"{r['peak_gflops']:.0f}" if r["peak_gflops"] else "n/a"
                blas = (f"{r['gflops'] / r['mfu_blas']:>8.0f} {r['mfu_blas']:>7.3f}" if r["mfu_blas"] is not None
                        else f"{'n/a':>8} {'n/a':>7}")
                print(f"{r['preset']:18} {dtype:5} {str(compiled):7} {r['kernels']:13} {f'{args.batch}×{seq}':>10} "
                      f"{r['tokens_per_s']:>10.0f} {r['gflops']:>8.1f} {peak:>8} {mfu:>6} {blas} "
                      f"{r['faults_per_step']:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
