"""Training throughput and MFU of a model on the current device.

    python bench/train_throughput.py                       # shakespeare-char, fp32 and bf16, eager and compiled
    python bench/train_throughput.py --preset tiny --dtype fp32 --compile 0

MFU = flops_per_token × tokens/s / peak, where the peak is the device's: a data-sheet figure on known GPUs, the
measured best square-matmul rate of the same dtype on a CPU over every GEMM backend it has (scalelm.train.peak: for
fp32, PyTorch's BLAS and oneDNN, whichever is faster, also when the model runs the other one). Each row times full optimizer
steps (forward, backward, clip, AdamW) after warm-up steps, and reports the median.

MFU/mm divides by the peak of torch.mm alone (for fp32, the BLAS), the convention of a plain PyTorch
setup; where oneDNN is faster (scalelm.model.linear) the MFU column's peak is higher than that one.

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

from scalelm.model import cpu_kernels, get_preset
from scalelm.model.cpu_attention import set_cpu_attention
from scalelm.model.gpt import GPT
from scalelm.model.linear import set_cpu_matmul
from scalelm.train.host_memory import keep_freed_host_memory
from scalelm.train.peak import cpu_matmul_rates, fastest_cpu_matmul, gpu_peak_flops


def measure(preset: str, dtype: str, compiled: bool, batch: int, seq: int, steps: int, device: str,
            fresh_peak: bool, compile_mode: str = "default", fuse_qkv: bool = True) -> dict:
    torch.manual_seed(0)
    cfg = get_preset(preset)
    model = GPT(cfg).to(device)
    for block in model.layers.values():
        block.attention.fuse_projections = fuse_qkv
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
            "tokens_per_s": tokens_per_s, "gflops": flops / 1e9, "peak_gflops": peak / 1e9 if peak else None,
            "faults_per_step": faults, "mfu": flops / peak if peak else None, "mfu_blas": flops / blas_peak if blas_peak else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--compile", choices=["0", "1", "both"], default="both")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=0, help="0 = the model's max_seq_len")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--compile-mode", default="default", choices=["default", "max-autotune"],
                   help="torch.compile mode; max-autotune also times Inductor's GEMM templates against ATen's")
    p.add_argument("--fuse-qkv", type=int, choices=[0, 1], default=1,
                   help="q/k/v as one matmul (the model's default) or three (as under tensor parallelism)")
    p.add_argument("--peak", choices=["fresh", "cached"], default="fresh",
                   help="CPU: measure the matmul peak around each row (fresh) or use the cached figure")
    p.add_argument("--cpu-matmul", choices=["auto", "onednn", "blas"], default="auto",
                   help="CPU fp32 GEMM backend of the linear layers, as train.cpu_matmul (auto = the faster one here)")
    p.add_argument("--cpu-attention", choices=["auto", "sdpa"], default="auto",
                   help="fp32 CPU attention: scalelm's kernel (auto, as the trainer) or PyTorch's flash attention")
    p.add_argument("--host-memory", choices=["keep", "system"], default="keep",
                   help="CPU: keep freed memory in the process as the trainer does (train.keep_host_memory), or "
                        "leave glibc's default, which returns it to the OS and page-faults it back every step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    kept = args.device == "cpu" and args.host_memory == "keep" and keep_freed_host_memory()
    matmul = args.cpu_matmul
    if args.device == "cpu" and matmul == "auto":
        matmul = fastest_cpu_matmul("fp32")
    if args.device == "cpu":
        set_cpu_matmul(matmul)  # used by fp32 rows only; bf16 autocast matmuls are PyTorch's own
        set_cpu_attention(args.cpu_attention)  # likewise
    seq = args.seq or get_preset(args.preset).max_seq_len
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    compiles = [False, True] if args.compile == "both" else [args.compile == "1"]
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"host memory {'kept' if kept else 'system allocator'}, fp32 matmul {matmul}, fp32 attention "
          f"{'scalelm kernel' if args.cpu_attention == 'auto' and cpu_kernels.available() else 'sdpa'}")
    print(f"{'preset':18} {'dtype':5} {'compile':7} {'batch×seq':>10} {'tokens/s':>10} {'GFLOP/s':>8} "
          f"{'peak':>8} {'MFU':>6} {'mm peak':>8} {'MFU/mm':>7} {'faults/step':>11}")
    for dtype in dtypes:
        for compiled in compiles:
            r = measure(args.preset, dtype, compiled, args.batch, seq, args.steps, args.device, args.peak == "fresh",
                        args.compile_mode, bool(args.fuse_qkv))
            mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
            peak = f"{r['peak_gflops']:.0f}" if r["peak_gflops"] else "n/a"
            blas = (f"{r['gflops'] / r['mfu_blas']:>8.0f} {r['mfu_blas']:>7.3f}" if r["mfu_blas"] is not None
                    else f"{'n/a':>8} {'n/a':>7}")
            print(f"{r['preset']:18} {dtype:5} {str(compiled):7} {f'{args.batch}×{seq}':>10} "
                  f"{r['tokens_per_s']:>10.0f} {r['gflops']:>8.1f} {peak:>8} {mfu:>6} {blas} {r['faults_per_step']:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
