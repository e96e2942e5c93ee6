"""Build a run from its Config and train it: the path `config → model → data → optimizer → resume → loop`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scalelm.config import Config, ConfigError, resolve_optimizer, to_toml
from scalelm.data import BatchLoader, default_dataset, load_dataset_meta, load_tokenizer, open_split
from scalelm.kernels.cpu import apply_cpu_kernels
from scalelm.kernels.cpu.linear import onednn_available
from scalelm.model.counting import num_params
from scalelm.model.gpt import GPT
from scalelm.parallel import ParallelDims, init_distributed, parallelize, rank0_choice, release_process_groups
from scalelm.parallel.ac import apply_ac
from scalelm.parallel.materialize import materialize
from scalelm.parallel.watchdog import Heartbeat, explain, install_stack_dump, is_peer_failure
from scalelm.train.adapters import AdapterView, adapter_trainer
from scalelm.train.checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    latest_good_checkpoint,
    load_checkpoint,
    load_distributed_checkpoint,
    remove_temporaries,
)
from scalelm.train.device import resolve_device
from scalelm.train.fits import check_fits
from scalelm.train.forecast import prepare_forecast
from scalelm.train.host_memory import keep_freed_host_memory, return_freed_host_memory
from scalelm.train.init_from import prepare_finetune
from scalelm.train.metrics import MetricsLogger
from scalelm.train.optim import build_optimizers
from scalelm.train.peak import fastest_cpu_matmul, peak_flops
from scalelm.train.precision import cpu_bf16_is_faster, resolve_precision
from scalelm.train.trainer import Trainer, token_loss


def build_model(cfg: Config, device: torch.device, seed: int, meta: bool = False) -> GPT:
    """The model built on the meta device (shapes only), then materialized on `device` — or, with `meta`, left
    there for `parallelize` to split and shard first and then materialize only this rank's shards. Each parameter
    is drawn on the CPU from (seed, its name) (model.gpt.initial_value): the same seed gives the same weights on
    any device and any layout."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(cfg.model)
    if not meta:
        materialize([model], device, seed)
    return model


KEPT_EVENTS = ("nonfinite",)
"""Event lines that belong to a step (kept on resume like metric lines); other events are the run's own."""


def _trim_metrics(run_dir: Path, step: int, head: list[dict[str, Any]]) -> None:
    """On resume, drop metric lines written after the checkpoint (they will be written again, identically) and the
    run's event lines (this run writes its own end line); `head` (this run's plan line) goes first, as in a fresh
    log. A line cut by a kill is dropped. Written beside and renamed over the log, so a kill here loses nothing."""
    path = run_dir / "metrics.jsonl"
    kept = [json.dumps(record) for record in head]
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") in (None, *KEPT_EVENTS) and record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(".tmp_metrics.jsonl")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


def _resume_point(cfg: Config, run_dir: Path, lead: bool) -> Path | None:
    """The newest undamaged checkpoint to resume from, as rank 0 finds it (every rank takes its answer); rank 0
    first deletes what killed saves left behind."""
    if lead:
        remove_temporaries(run_dir)
    if not cfg.checkpoint.resume:
        return None
    found, problem = None, None
    if lead:
        found = latest_good_checkpoint(run_dir, cfg.checkpoint.verify)
        if found is None and checkpoint_dirs(run_dir):  # starting over would prune them: nothing is lost unasked
            problem = (f"every checkpoint in {run_dir / 'checkpoints'} is damaged (see the warnings above); move them "
                       f"away to start over, or pass --checkpoint.resume false")
    found, problem = rank0_choice((None if found is None else str(found), problem))
    if problem is not None:
        raise CheckpointError(problem)
    return Path(found) if found is not None else None


ModelHook = Callable[[nn.Module, Config], None]


def train(cfg: Config, *, prepare_model: ModelHook | None = None,
          trainer_class: Callable[..., Trainer] = Trainer) -> dict[str, Any]:
    """Train per `cfg`; returns the final `end` record. Under torchrun (WORLD_SIZE > 1) every rank runs this.

    Other objectives reuse this path: `prepare_model(model, cfg)` changes the built plain model in place before
    any CPU kernel or parallelism is applied (new weights, a new head, adapters), and `trainer_class` (called
    with Trainer's arguments) may override `Trainer.forward_loss` and evaluation."""
    device = resolve_device(cfg.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # One process keeps freed memory for speed; ranks that shard the model hand it back, for memory: a heap that
    # never gives memory back held each FSDP rank at 1.6× its peak of live tensors (gpt2-355m, bench/memory.py).
    if device.type == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return_freed_host_memory()
    elif device.type == "cpu" and cfg.cpu.keep_host_memory:
        keep_freed_host_memory()
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    owns_group = not dist.is_initialized()  # a caller that set up the process group also tears it down
    install_stack_dump()
    rank, world_size = init_distributed(device, cfg.parallel.timeout_s)
    heartbeat = Heartbeat(rank, world_size, cfg.parallel.timeout_s) if world_size > 1 else None
    try:
        return _train(cfg, device, rank, world_size, prepare_model, trainer_class)
    except RuntimeError as e:  # a peer that died or stopped: say which, instead of a C++ stack
        if heartbeat is None or not is_peer_failure(e):
            raise
        raise explain(e, rank, cfg.parallel.timeout_s, heartbeat) from None
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if owns_group and dist.is_initialized():
            release_process_groups()


def _choose_cpu_matmul(cfg: Config, device: torch.device, precision: str) -> str | None:
    """The fp32 linear layers' GEMM backend per cpu.matmul, or None where the choice does not apply (GPU, or
    autocast: those matmuls are PyTorch's own). All ranks use rank 0's choice."""
    if device.type != "cpu" or precision != "fp32":
        return None
    choice = cfg.cpu.matmul
    if choice == "onednn" and not onednn_available():
        raise ConfigError("cpu.matmul=onednn but this PyTorch build has no oneDNN (mkldnn); use auto or blas")
    if choice == "auto":
        choice = rank0_choice(fastest_cpu_matmul("fp32"))  # blas where this build has no oneDNN
    return choice


def _muon_ns_dtype(device: torch.device) -> str:
    """Muon orthogonalizes in bf16 (torch's choice) unless this CPU runs fp32 matmuls faster (train/muon.py).
    All ranks use rank 0's choice: data-parallel replicas must apply identical updates."""
    return rank0_choice("bf16" if device.type != "cpu" or cpu_bf16_is_faster() else "fp32")


def _train(cfg: Config, device: torch.device, rank: int, world_size: int, prepare_model: ModelHook | None,
           trainer_class: Callable[..., Trainer]) -> dict[str, Any]:
    try:
        precision = resolve_precision(cfg.train.dtype, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.train.dtype == "auto":  # ranks measure their own CPU rates: rank 0's choice rules
        precision = resolve_precision(rank0_choice(precision.name), device)
    cfg.train.dtype = precision.name  # saved resolved, so a resume runs in the same precision
    # The perf model's view of this run; with parallel.auto the planner writes the layout into cfg first.
    forecast = prepare_forecast(cfg, device, world_size, precision.name)
    check_fits(cfg, world_size, precision.name, device)  # a model that cannot fit a rank: refused before building
    matmul = _choose_cpu_matmul(cfg, device, precision.name)
    dims = ParallelDims.from_config(cfg, world_size) if world_size > 1 else None  # validates before any work
    cfg.optim.name = resolve_optimizer(cfg, dims.tp if dims else 1, dims.dp if dims else 1)  # saved resolved
    muon_ns = _muon_ns_dtype(device) if cfg.optim.name == "muon" else "bf16"
    lead = rank == 0  # only rank 0 writes files other than checkpoint shards
    run_dir = Path(cfg.out)
    data_dir = Path(cfg.data.path) if cfg.data.path else default_dataset()
    meta = load_dataset_meta(data_dir)
    tokenizer = load_tokenizer(data_dir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the dataset's tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}; set --model.vocab_size {64 * -(-tokenizer.vocab_size // 64)}")

    resume_from = _resume_point(cfg, run_dir, lead)
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None and (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()  # a fresh run in an old directory starts a fresh log

    # A distributed run builds on the meta device and materializes only this rank's shards (in parallelize). A
    # `prepare_model` hook may load weights or add modules, so it gets a materialized plain model (every rank
    # then holds the whole model until parallelize shards it, as a single process does).
    finetune = bool(cfg.init_from or cfg.lora.rank)  # loads weights into the plain model, as a hook does
    model = build_model(cfg, device, cfg.seed, meta=dims is not None and prepare_model is None and not finetune)
    if finetune:
        prepare_finetune(model, cfg)
    if prepare_model is not None:
        prepare_model(model, cfg)
    # CPU speedups are module swaps on the plain model, before any parallelism wraps it. Tensor parallelism's
    # DTensor shards are left alone; FSDP computes on gathered plain tensors, so its runs keep the kernels.
    cpu_kernels = []
    if device.type == "cpu" and (dims is None or dims.tp == 1):
        cpu_kernels = apply_cpu_kernels(model, matmul=matmul or "blas", kernels=cfg.cpu.kernels)
    parallel = None
    if dims is None:
        apply_ac(model, cfg.parallel.activation_checkpoint, cfg.parallel.ac_every)
        if cfg.train.compile:
            for block in model.layers.values():
                block.compile()
        optimizers = build_optimizers(model, cfg.optim, muon_ns_dtype=muon_ns)
        loader = BatchLoader(open_split(data_dir, "train", cfg.data.verify), cfg.train.seq_len, cfg.train.global_batch,
                             cfg.seed)
    else:
        # PP split → TP → AC → compile → FSDP on the meta model, then each rank's shards materialized from the
        # run seed (the single-process weights, whatever the layout), DDP; then optimizers over the result.
        mesh = dims.build_mesh(device.type)
        loss_fn = partial(token_loss, tokens_per_step=cfg.train.global_batch * cfg.train.seq_len,
                          tp_mesh=mesh["tp"] if dims.tp > 1 else None)
        parallel = parallelize(model, cfg, dims, mesh, device, loss_fn)
        zero1 = dims.flat["dp"] if dims.ddp and dims.zero == 1 else None
        optimizers = build_optimizers(parallel.parts, cfg.optim, zero1_mesh=zero1, muon_ns_dtype=muon_ns)
        model = parallel.parts[0] if dims.pp == 1 else None
        loader = BatchLoader(open_split(data_dir, "train", cfg.data.verify), cfg.train.seq_len, cfg.train.global_batch,
                             cfg.seed, dp_rank=parallel.coords["dp"], dp_size=dims.dp)
    peak, peak_note = peak_flops(device, precision.name)
    start_step = 0
    state = None
    if resume_from is not None:
        if parallel is None:
            state = load_checkpoint(resume_from, AdapterView(model) if cfg.lora.rank else model, optimizers)
        else:
            state = load_distributed_checkpoint(resume_from, parallel.parts, optimizers, cfg.model)
        start_step = state["step"]
        loader.load_state_dict(state["loader"])  # the same data stream? (checked before anything is written)
        if lead:
            _trim_metrics(run_dir, start_step, [forecast.record()])
    if lead:  # once a resume has succeeded: a refused one leaves the run directory as it was
        (run_dir / "config.toml").write_text(to_toml(cfg))
        tokenizer.save(run_dir / "tokenizer")  # `scalelm generate RUN_DIR` decodes without the dataset
    logger = MetricsLogger(run_dir, cfg.train.steps, start_step, enabled=lead, progress=cfg.metrics.progress,
                           tensorboard=cfg.metrics.tensorboard)
    if state is None:
        logger.log(forecast.record())  # the first line of a fresh log
    if cfg.lora.rank:  # a LoRA run's checkpoints hold its adapters alone
        trainer_class = adapter_trainer(trainer_class)
    trainer = trainer_class(cfg, model, optimizers, loader, open_split(data_dir, "val", cfg.data.verify), tokenizer,
                            run_dir, device, precision, logger, peak, parallel, forecast.prediction)
    if state is not None:
        trainer.load_state_dict(state)
        logger.print(f"resumed from {resume_from} at step {start_step}")
    if dims is not None:
        logger.print(f"parallel: {dims.describe()}, backend {dist.get_backend()}")
    kernels_note = f", CPU kernels: {', '.join(cpu_kernels)}" if cpu_kernels else ""
    logger.print(f"model {cfg.model.preset or 'custom'}: {num_params(cfg.model):,} parameters, "
                 f"{trainer.flops_per_token / 1e6:.1f} MFLOP/token; data {data_dir.name} "
                 f"({meta.get('tokenizer', '?')}, vocab {tokenizer.vocab_size}); device {device}, {precision.name}"
                 f"{f', matmul {matmul}' if matmul else ''}{kernels_note}"
                 f"{f', Muon orthogonalizes in {muon_ns}' if cfg.optim.name == 'muon' else ''}; "
                 f"{peak_note}")
    logger.print(forecast.line())
    try:
        return trainer.fit()
    finally:
        logger.close()
