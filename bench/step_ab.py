"""A/B of one model option in one process, alternating training steps.

    python bench/step_ab.py --compare fuse-qkv --steps 12      # q/k/v as one matmul vs three
    python bench/step_ab.py --compare cpu-matmul --steps 8     # fp32 linear layers on oneDNN vs PyTorch's BLAS
    python bench/step_ab.py --compare cpu-matmul --compile 1
    python bench/step_ab.py --compare cpu-attention --compile 1   # flash attention vs scalelm's fp32 kernel

Two identical models (same seed) take fp32 training steps (forward, backward, fused AdamW) in turn, so a change
of the machine's speed hits both alike; a difference of a few percent is below what separate invocations of
train_throughput.py can resolve on a shared machine. Prints the median and best step time of each after two
warm-up rounds (compilation included in those), and the relative change of the median.

- fuse-qkv: `Attention.fuse_projections` off (three matmuls, what tensor parallelism runs) and on.
- cpu-matmul: `scalelm.model.linear` backend blas and onednn (train.cpu_matmul).
- cpu-attention: `scalelm.model.cpu_attention` backend sdpa (PyTorch's flash attention, RoPE as its own pass) and
  auto (scalelm's kernel, RoPE inside it; train.cpu_attention).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from scalelm.model import get_preset
from scalelm.model.cpu_attention import cpu_attention_backend
from scalelm.model.gpt import GPT
from scalelm.model.linear import cpu_matmul_backend
from scalelm.train.host_memory import keep_freed_host_memory

# name -> (variant name, fuse_projections, cpu matmul backend, cpu attention backend) for the A and the B side
COMPARISONS = {
    "fuse-qkv": [("three matmuls", False, "blas", "auto"), ("fused q/k/v", True, "blas", "auto")],
    "cpu-matmul": [("blas", True, "blas", "auto"), ("onednn", True, "onednn", "auto")],
    "cpu-attention": [("sdpa", True, "blas", "sdpa"), ("scalelm kernel", True, "blas", "auto")],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="fuse-qkv")
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--compile", type=int, choices=[0, 1], default=0, help="torch.compile each model")
    p.add_argument("--steps", type=int, default=12, help="rounds; each round is one step of each variant")
    args = p.parse_args()
    keep_freed_host_memory()  # as the trainer does
    cfg = get_preset(args.preset)
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.max_seq_len))
    y = torch.randint(0, cfg.vocab_size, (args.batch, cfg.max_seq_len))
    variants = {}
    for name, fused, backend, attention in COMPARISONS[args.compare]:
        torch.manual_seed(0)
        model = GPT(cfg)
        for block in model.layers.values():
            block.attention.fuse_projections = fused
        forward = torch.compile(model) if args.compile else model
        variants[name] = (forward, backend, attention, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), [])
    for i in range(args.steps + 2):
        for forward, backend, attention, opt, times in variants.values():
            start = time.perf_counter()
            with cpu_matmul_backend(backend), cpu_attention_backend(attention):
                F.cross_entropy(forward(x).flatten(0, 1), y.flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.perf_counter() - start)
    print(f"{args.preset}, batch {args.batch}×{cfg.max_seq_len}, fp32, {'compiled' if args.compile else 'eager'}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':14} {'median s':>9} {'best s':>8}")
    medians = []
    for name, (*_, times) in variants.items():
        medians.append(statistics.median(times))
        print(f"{name:14} {medians[-1]:>9.3f} {min(times):>8.3f}")
    print(f"B vs A: {100 * (medians[1] / medians[0] - 1):+.1f}% median step time")


if __name__ == "__main__":
    main()
