"""Fine-tuning cost on this machine: a full fine-tune against LoRA (scalelm.train.lora) on the same model.

    python bench/finetune.py                               # shakespeare-char, batch 8 × 128 tokens, 5 repeats
    python bench/finetune.py --preset tiny --seq 32 --repeats 2     # a smoke run

Each row builds the model from one seed, applies LoRA (or not), builds the run's optimizers (AdamW; LoRA freezes
the base), then times optimizer steps — forward, backward, clip, step, zero_grad — on random token batches: one
untimed warm-up step, then the median of `--repeats` timed steps. Trainable parameters and optimizer-state bytes
(AdamW keeps two fp32 moments per trainable parameter) are counted after the steps. LoRA runs through torch's
parametrizations, so the adapted weight W + (alpha/r)·BA is formed every forward and its full gradient every
backward: it saves optimizer memory and checkpoint size, not matmul time. The header gives the load average:
time on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from scalelm.config import OptimConfig
from scalelm.model import get_preset
from scalelm.model.gpt import GPT
from scalelm.train.lora import apply_lora
from scalelm.train.optim import build_optimizers


def step_time_s(model: torch.nn.Module, batch: int, seq: int, repeats: int) -> tuple[float, list]:
    optimizers = build_optimizers(model, OptimConfig(name="adamw", lr=1e-4))
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.cfg.vocab_size
    times = []
    for i in range(repeats + 1):
        x = torch.randint(0, vocab, (batch, seq + 1))
        start = time.perf_counter()
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times), optimizers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args()
    print(f"# {args.preset}, batch {args.batch} × {args.seq} tokens, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} steps; load average {os.getloadavg()[0]:.1f}")
    print(f"{'fine-tune':<24} {'trainable':>12} {'share':>7} {'optimizer MiB':>14} {'step s':>8} {'vs full':>8}")
    base = None
    for name, targets in (("full", None), (f"LoRA r{args.rank} q,v", "q,v"),
                          (f"LoRA r{args.rank} all-linear", "all-linear")):
        torch.manual_seed(0)
        model = GPT(get_preset(args.preset))
        total = model.num_params()
        if targets is not None:
            apply_lora(model, args.rank, 2.0 * args.rank, targets)
        seconds, optimizers = step_time_s(model, args.batch, args.seq, args.repeats)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        state = sum(t.numel() * t.element_size() for opt in optimizers for s in opt.state.values()
                    for t in s.values() if torch.is_tensor(t))
        base = base or seconds
        print(f"{name:<24} {trainable:>12,} {100 * trainable / total:>6.2f}% {state / 2**20:>14.2f} "
              f"{seconds:>8.3f} {seconds / base:>7.2f}×")


if __name__ == "__main__":
    main()
