"""Tensor-parallel generation on every rank of one torchrun launch; rank 0 writes what was generated as JSON.

    torchrun --nproc-per-node 2 tests/infer/tp_worker.py OUT.json RUN_DIR [RUN_DIR ...]

For each run and each of MODES (greedy; sampled with a seed): `generate_tp` (the CLI's path) continues PROMPTS as
one left-padded batch with the KV cache, and a forward hook keeps the last-position logits of every forward (the
prefill, then one per decode step). Every rank must generate the same tokens. Afterwards no gloo thread may be
left: the process groups were released.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from scalelm.infer import Sampling
from scalelm.infer.tp import generate_tp, tp_session
from scalelm.model.gpt import GPT

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "a"]  # different lengths: a left-padded batch
NEW_TOKENS = 12
MODES = {"greedy": dict(sampling=Sampling(temperature=0.0), seed=0), "sampled": dict(sampling=Sampling(), seed=1)}


def generate_with_logits(generate, *args, **kwargs) -> tuple[list[list[int]], list[list[list[float]]]]:
    """(tokens of each completion, last-position logits [B, V] of every forward of a GPT) of
    `generate(*args, **kwargs)`."""
    logits: list[torch.Tensor] = []

    def keep(module, args, output):
        if isinstance(module, GPT):
            logits.append(output[:, -1].detach().float().clone())

    handle = torch.nn.modules.module.register_module_forward_hook(keep)
    try:
        completions = generate(*args, **kwargs)
    finally:
        handle.remove()
    return [c.tokens for c in completions], [step.tolist() for step in logits]


def gloo_threads() -> list[str]:
    tasks = "/proc/self/task"
    names = (open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks))
    return [name for name in names if "gloo" in name]


def main() -> None:
    out, runs = sys.argv[1], sys.argv[2:]
    results = {}
    with tp_session("cpu") as (rank, world):
        for run in runs:
            for mode, kwargs in MODES.items():
                tokens, logits = generate_with_logits(generate_tp, run, PROMPTS, max_new_tokens=NEW_TOKENS,
                                                      **kwargs)
                everyone: list = [None] * world
                dist.all_gather_object(everyone, tokens)
                if any(other != tokens for other in everyone):
                    raise SystemExit(f"rank {rank}: the ranks generated different tokens ({mode}, {run}): {everyone}")
                results[f"{run} {mode}"] = {"tokens": tokens, "logits": logits, "world": world}
    left = gloo_threads()
    if left:
        raise SystemExit(f"gloo threads still running after the process groups were released: {left}")
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
