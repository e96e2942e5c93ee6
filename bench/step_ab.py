"""A/B of one CPU speedup in the fp32 training step: two variants of the same model, stepped in turn.

    python bench/step_ab.py --compare cpu-kernels --compile 1 --steps 12   # plain PyTorch vs apply_cpu_kernels
    python bench/step_ab.py --compare cpu-matmul --steps 12                # kernels on BLAS vs on oneDNN GEMMs

Two identical models (same seed) take fp32 training steps (forward, backward, fused AdamW) in turn, so a change
of the shared machine's speed hits both alike; the table gives each one's median and best step time and B's
change against A.

- cpu-kernels: the plain model against the one `scalelm.kernels.cpu.apply_cpu_kernels` converted (fused q/k/v,
  attention, RMSNorm and embedding kernels), both on PyTorch's BLAS.
- cpu-matmul: both converted, linear layers on the BLAS (A) and on oneDNN (B) (cpu.matmul).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from scalelm.kernels.cpu import apply_cpu_kernels
from scalelm.model import get_preset
from scalelm.model.gpt import GPT
from scalelm.train.host_memory import keep_freed_host_memory

# name -> [(variant name, apply_cpu_kernels arguments or None for the plain model)] for the A and the B side
COMPARISONS = {
    "cpu-kernels": [("plain PyTorch", None), ("CPU kernels", dict(matmul="blas"))],
    "cpu-matmul": [("blas", dict(matmul="blas")), ("onednn", dict(matmul="onednn"))],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="cpu-kernels")
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
    for name, kernels in COMPARISONS[args.compare]:
        torch.manual_seed(0)
        model = GPT(cfg)
        if kernels is not None:
            apply_cpu_kernels(model, **kernels)
        forward = torch.compile(model) if args.compile else model
        variants[name] = (forward, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), [])
    for i in range(args.steps + 2):
        for forward, opt, times in variants.values():
            start = time.perf_counter()
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
