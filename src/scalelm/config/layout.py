"""Which parallel layouts and optimizers the trainer can run, checked against a Config (torch-free).

`validate_parallel` is the one place that knows the trainer's rules (divisibility by heads and batch, ZeRO with
TP, schedules, sequence parallelism, gradient compression); the CLI, the parallel dims, the trainer and the
planner integration (`train.forecast`) all ask it, so a layout is accepted or refused the same way everywhere.
"""

from __future__ import annotations

from scalelm.config.sections import Config, ConfigError


def muon_fits(cfg: Config, tp: int, dp: int) -> bool:
    """Muon orthogonalizes whole matrices: shards (FSDP, HSDP, TP) are gathered one matrix at a time on the
    device (train/muon.py). Only FSDP's CPU offload keeps the shards where that gather cannot run."""
    return not (cfg.parallel.cpu_offload and dp > 1 and cfg.parallel.zero >= 2)


def resolve_optimizer(cfg: Config, tp: int = 1, dp: int = 1) -> str:
    """The optimizer `optim.name` means (`auto` → muon on every layout, see OptimConfig.name): the same command
    trains the same model on one process and on many. A layout Muon cannot run is refused by validate_parallel,
    never given another optimizer."""
    if cfg.lora.rank and cfg.optim.name == "auto":
        return "adamw"  # LoRA's adapters are low-rank factors, not the matrices Muon orthogonalizes
    return "muon" if cfg.optim.name == "auto" else cfg.optim.name


def validate_parallel(cfg: Config, world_size: int | None = None) -> dict[str, int]:
    """Check the `parallel` section against the model and, when known, the world size; returns the resolved
    degrees {dp_replicate, dp_shard, tp, pp, stages_per_rank, microbatches}: microbatches is the pipeline's count
    (`pipeline_microbatches`), which every consumer takes from here. Messages say what to change."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    for key in ("dp_replicate", "tp", "pp", "ac_every", "powersgd_rank"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(p, key)} must be >= 1")
    for key in ("pp_microbatches", "pp_stages_per_rank", "powersgd_start_step"):
        if getattr(p, key) < 0:
            raise ConfigError(f"parallel.{key}={getattr(p, key)} must be >= 0")
    if p.dp_shard == 0 or p.dp_shard < -1:
        raise ConfigError(f"parallel.dp_shard={p.dp_shard} must be >= 1, or -1 for the remaining ranks")
    if p.zero not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero={p.zero} is not one of 0, 1, 2, 3")
    if p.tp > 1:
        for key, value in (("model.n_head", m.n_head), ("model.n_kv_head", m.kv_heads),
                           ("model.d_ff (MLP width)", m.ffn_hidden), ("model.vocab_size", m.vocab_size)):
            if value % p.tp:
                ok = [d for d in range(1, value + 1) if value % d == 0 and d <= 64]
                raise ConfigError(f"parallel.tp={p.tp} does not divide {key}={value}; use one of {ok[-6:]}")
        if p.sequence_parallel and t.seq_len % p.tp:
            raise ConfigError(f"parallel.sequence_parallel splits train.seq_len={t.seq_len} over tp={p.tp}; "
                              f"use a seq_len divisible by {p.tp}")
        if p.sequence_parallel and m.pos != "rope":
            raise ConfigError(f"parallel.sequence_parallel needs model.pos='rope' (got {m.pos!r}): a position table "
                              f"would be added to a sequence shard; set model.pos=rope or sequence_parallel=false")
    if p.zero in (0, 1) and p.tp > 1:
        raise ConfigError(f"parallel.zero={p.zero} (DDP) cannot wrap tensor-parallel weights; use parallel.zero=2 or 3 "
                          f"(FSDP2) with parallel.tp={p.tp}")
    if p.grad_compression != "none" and p.zero != 0:
        raise ConfigError(f"parallel.grad_compression={p.grad_compression!r} is a DDP communication hook; "
                          f"set parallel.zero=0 (got {p.zero})")
    if p.cpu_offload and p.zero < 2:
        raise ConfigError(f"parallel.cpu_offload needs FSDP2; set parallel.zero=2 or 3 (got {p.zero})")
    stages_per_rank = p.pp_stages_per_rank or (1 if p.pp_schedule in ("gpipe", "1f1b") else 2)
    if p.pp > 1:
        if p.pp_schedule in ("gpipe", "1f1b") and stages_per_rank != 1:
            raise ConfigError(f"parallel.pp_schedule={p.pp_schedule!r} runs one stage per rank; set "
                              f"parallel.pp_stages_per_rank=1 or use interleaved-1f1b")
        if p.pp_schedule == "zbv" and stages_per_rank != 2:
            raise ConfigError("parallel.pp_schedule='zbv' needs parallel.pp_stages_per_rank=2 (a V of two stages per rank)")
        if p.pp_schedule in ("interleaved-1f1b", "interleaved-zb") and stages_per_rank < 2:
            raise ConfigError(f"parallel.pp_schedule={p.pp_schedule!r} needs parallel.pp_stages_per_rank >= 2")
        n_stages = p.pp * stages_per_rank
        if n_stages > m.n_layer:
            raise ConfigError(f"parallel.pp={p.pp} × pp_stages_per_rank={stages_per_rank} = {n_stages} stages but "
                              f"model.n_layer={m.n_layer}; every stage needs a block: lower pp or pp_stages_per_rank")
    degrees = {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "tp": p.tp, "pp": p.pp,
               "stages_per_rank": stages_per_rank}
    if world_size is None:  # the per-rank batch is known only when dp_shard is explicit
        dp = p.dp_replicate * p.dp_shard if p.dp_shard > 0 else 0
        local = t.global_batch // dp if dp and t.global_batch % dp == 0 else None
        if local is not None and t.micro_batch and local % t.micro_batch:
            local = None  # refused below once the world size is known
        degrees["microbatches"], _ = pipeline_microbatches(cfg, local)
        return degrees
    fixed = p.dp_replicate * p.tp * p.pp
    if p.dp_shard == -1:
        if world_size % fixed:
            raise ConfigError(f"{world_size} processes are not divisible by dp_replicate × tp × pp = {fixed}; "
                              f"launch a multiple of {fixed} processes or change the parallel degrees")
        degrees["dp_shard"] = world_size // fixed
    elif fixed * p.dp_shard != world_size:
        raise ConfigError(f"dp_replicate × dp_shard × tp × pp = {p.dp_replicate}×{p.dp_shard}×{p.tp}×{p.pp} = "
                          f"{fixed * p.dp_shard} but {world_size} processes were launched; set parallel.dp_shard=-1 "
                          f"or launch {fixed * p.dp_shard}")
    dp = degrees["dp_replicate"] * degrees["dp_shard"]
    if resolve_optimizer(cfg) == "muon" and not muon_fits(cfg, p.tp, dp):
        raise ConfigError(f"optim.name={cfg.optim.name} is Muon, which gathers each matrix on the device to "
                          f"orthogonalize it, but parallel.cpu_offload keeps the shards in host memory; set "
                          f"optim.name=adamw or parallel.cpu_offload=false")
    if t.global_batch % dp:
        raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by the {dp} data-parallel ranks; "
                          f"use a multiple of {dp}")
    local = t.global_batch // dp
    if t.micro_batch and local % t.micro_batch:
        raise ConfigError(f"train.micro_batch={t.micro_batch} does not divide the per-rank batch {local} "
                          f"(global_batch / {dp} data-parallel ranks)")
    degrees["microbatches"], source = pipeline_microbatches(cfg, local)
    if p.pp > 1:
        eval_batch = min(t.global_batch, 32)
        if local % degrees["microbatches"] or eval_batch % degrees["microbatches"]:
            raise ConfigError(f"{source} must divide the per-rank batch {local} and the evaluation batch "
                              f"{eval_batch}; change it or train.global_batch")
    return degrees


def pipeline_microbatches(cfg: Config, local: int | None) -> tuple[int, str]:
    """Pipeline micro-batches per optimizer step and the setting they come from (for messages). With pp > 1,
    train.micro_batch = m means what it means without a pipeline, sequences per forward/backward: the per-rank
    batch `local` is split into local / m micro-batches; else parallel.pp_microbatches (0 = pp). Setting both
    is fine only when they agree. `local` None (world size unknown): the count from pp_microbatches or pp."""
    p, t = cfg.parallel, cfg.train
    if p.pp > 1 and t.micro_batch and local is not None:
        n = local // t.micro_batch
        if p.pp_microbatches and p.pp_microbatches != n:
            fix = (f" or train.micro_batch={local // p.pp_microbatches}" if local % p.pp_microbatches == 0 else "")
            raise ConfigError(f"train.micro_batch={t.micro_batch} splits the per-rank batch {local} into {n} pipeline "
                              f"micro-batches but parallel.pp_microbatches={p.pp_microbatches}; set only one of them: "
                              f"parallel.pp_microbatches=0{fix}")
        source = f"train.micro_batch={t.micro_batch} ({local} per-rank / {t.micro_batch} = {n} pipeline micro-batches)"
    else:
        n = p.pp_microbatches or p.pp
        source = f"parallel.pp_microbatches={n}"
    if p.pp > 1 and p.pp_schedule not in ("gpipe", "1f1b") and n % p.pp:
        raise ConfigError(f"{source} must be a multiple of parallel.pp={p.pp} for the {p.pp_schedule} schedule")
    if p.pp > 1 and p.pp_schedule == "1f1b" and n < p.pp:  # torch's Schedule1F1B refuses fewer
        raise ConfigError(f"{source}: the 1f1b schedule needs at least parallel.pp={p.pp} micro-batches per step; "
                          f"{'lower train.micro_batch' if source.startswith('train.') else 'raise it'} or use gpipe")
    return n, source
