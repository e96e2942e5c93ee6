"""A/B of the fused q/k/v projection (`Attention.fuse_projections`) in one process, alternating steps.

    python bench/fuse_qkv_ab.py --steps 12

Two identical models (same seed), one computing q, k and v as one matmul over the concatenated weights and one as
three matmuls (what tensor parallelism runs), take fp32 training steps in turn, so a change of the machine's speed
hits both alike; a few-percent difference is below what separate invocations of train_throughput.py can resolve
on a shared machine. Prints the median and best step time of each after two warm-up rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from scalelm.model import get_preset
from scalelm.model.gpt import GPT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=12, help="rounds; each round is one step of each variant")
    args = p.parse_args()
    cfg = get_preset(args.preset)
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.max_seq_len))
    y = torch.randint(0, cfg.vocab_size, (args.batch, cfg.max_seq_len))
    variants = {}
    for name, fused in (("three matmuls", False), ("fused q/k/v", True)):
        torch.manual_seed(0)
        model = GPT(cfg)
        for block in model.layers.values():
            block.attention.fuse_projections = fused
        variants[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), [])
    for i in range(args.steps + 2):
        for model, opt, times in variants.values():
            start = time.perf_counter()
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.perf_counter() - start)
    print(f"{args.preset}, batch {args.batch}×{cfg.max_seq_len}, fp32, {torch.get_num_threads()} threads")
    print(f"{'variant':14} {'median s':>9} {'best s':>8}")
    for name, (_, _, times) in variants.items():
        print(f"{name:14} {statistics.median(times):>9.3f} {min(times):>8.3f}")


if __name__ == "__main__":
    main()
