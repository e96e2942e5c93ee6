"""Tensor-parallel generation: one model split over the ranks of a process group, every rank running the same
`Generator`.

Each rank loads the whole model, then keeps its share of the attention heads, the MLP's hidden units and the
vocabulary (the Megatron layout of `scalelm.parallel.tp`); the head all-gathers the logits, so every rank holds
the full logits of every step. All-reduce and all-gather give every rank the same result, so ranks that run the
same Generator with the same seed sample the same tokens and stop at the same step with no other communication.
Each rank's KV cache holds its own kv heads.

`scalelm generate --nproc N` checks the model with `check_run_tp` first; then, under torchrun, every rank calls
`generate_tp(path, prompts, ...)` and rank 0 prints. Within a process group already open (several models in one
launch), use `load_sharded` inside `tp_session`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from scalelm.infer.generate import Completion, GenerationError, Generator


def check_tp(cfg, tp: int) -> None:
    """GenerationError unless `tp` ranks can split this model: tp must divide the query and key/value heads, the
    MLP width and the vocabulary."""
    sizes = {"model.n_head": cfg.n_head, "model.n_kv_head (key/value heads)": cfg.kv_heads,
             "model.d_ff (MLP width)": cfg.ffn_hidden, "model.vocab_size": cfg.vocab_size}
    if tp < 1:
        raise GenerationError(f"tensor-parallel generation needs at least 1 process, got {tp}")
    for name, value in sizes.items():
        if value % tp:
            ok = [d for d in range(1, 65) if all(v % d == 0 for v in sizes.values())]
            raise GenerationError(f"tensor parallelism over {tp} processes does not divide {name}={value}; "
                                  f"use a number of processes (--nproc) among {ok}")


def check_run_tp(path: str | Path, tp: int) -> None:
    """`check_tp` for the model of a run or checkpoint directory, from its model.json alone: the CLI calls it
    before starting `tp` processes."""
    from scalelm.model.config import ModelConfig
    from scalelm.train.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    check_tp(ModelConfig.from_dict(json.loads((checkpoint / "model.json").read_text())), tp)


def shard_for_generation(model: nn.Module, tp: int | None = None) -> nn.Module:
    """Split `model` (a GPT loaded identically on every rank, in eval mode) in place over the `tp` ranks of the
    process group (default: all of them; tp must be the group's size) and return it. Its forward then returns
    full logits as a plain tensor on every rank, and a KV cache works as in one process. tp = 1 without a
    process group returns the model unchanged."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    tp = world if tp is None else tp
    check_tp(model.cfg, tp)
    if tp != world:
        raise GenerationError(f"tensor-parallel generation over {tp} processes needs a process group of exactly "
                              f"{tp} ranks, this one has {world}; start {tp} processes (--nproc {tp})")
    if tp == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh

    from scalelm.parallel.tp import apply_tp

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",))
    # No sequence parallelism: a decode step has one position per row, nothing to split along the sequence.
    apply_tp(model, mesh, sequence_parallel=False, loss_parallel=False)
    return model


def rank_device(device: str | torch.device) -> torch.device:
    """This rank's device: "cuda" means the GPU of its LOCAL_RANK under torchrun; anything else as given."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def tp_session(device: str | torch.device = "cpu") -> Iterator[tuple[int, int]]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU) and yield (rank, world size); on
    exit, release the process groups if this session created them (`release_process_groups`: no gloo thread may
    outlive them). Nothing to join in a single process: (0, 1). Sharded models and Generators made inside must be
    out of scope by the end, or the groups they hold stay alive."""
    from scalelm.parallel.parallelize import init_distributed, release_process_groups

    created = not (dist.is_available() and dist.is_initialized())
    rank, world = init_distributed(rank_device(device))
    try:
        yield rank, world
    finally:
        if created and dist.is_initialized():
            release_process_groups()


def load_sharded(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """(model split over every rank of the open process group, tokenizer) of a run or checkpoint directory; call
    it on every rank. Each rank first loads the whole model on its device."""
    from scalelm.infer.load import load_for_inference

    model, tokenizer = load_for_inference(path, rank_device(device))
    return shard_for_generation(model), tokenizer


def generate_tp(path: str | Path, prompts: str | Sequence[str], device: str | torch.device = "cpu",
                compile: bool = False, **generate_kwargs) -> list[Completion]:
    """`Generator(model, tokenizer, compile).generate(prompts, **generate_kwargs)` with the model of `path` split
    over every rank of a torchrun launch (or whole in a single process). Call it on every rank with the same
    arguments (the same seed): each returns the same completions, so rank 0 alone prints them. Joins the process
    group and releases it before returning unless one was already open."""
    with tp_session(device):
        return _generate(path, prompts, device, compile, generate_kwargs)


def _generate(path, prompts, device, compile: bool, generate_kwargs: dict) -> list[Completion]:
    # Its own frame: the sharded model is gone when tp_session releases the process groups.
    model, tokenizer = load_sharded(path, device)
    return Generator(model, tokenizer, compile=compile).generate(prompts, **generate_kwargs)
