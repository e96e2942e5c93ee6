"""Which parallel layouts and optimizers the trainer can run, checked against a Config (torch-free).

`validate_parallel` is the one place that knows the trainer's rules (divisibility by heads and batch, ZeRO with
TP, schedules, sequence parallelism, gradient compression); the CLI, the parallel dims, the trainer and the
planner integration (`train.forecast`) all ask it, so a layout is accepted or refused the same way everywhere.
"""

from __future__ import annotations

from scalelm.config import Config, ConfigError


def muon_fits(cfg: Config, tp: int, dp: int) -> bool:
    """Muon needs whole matrices on each rank: no tensor parallelism, no FSDP sharding."""
    return tp == 1 and not (dp > 1 and cfg.parallel.zero >= 2)


def resolve_optimizer(cfg: Config, tp: int = 1, dp: int = 1) -> str:
    """The optimizer `optim.name` means for this layout (`auto` → muon or adamw, see OptimConfig.name)."""
    if cfg.optim.name != "auto":
        return cfg.optim.name
    return "muon" if muon_fits(cfg, tp, dp) else "adamw"


def validate_parallel(cfg: Config, world_size: int | None = None) -> dict[str, int]:
    """Check the `parallel` section against the model and, when known, the world size; returns the resolved
    degrees {dp_replicate, dp_shard, tp, pp, stages_per_rank, microbatches}. Messages say what to change."""
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
        if t.micro_batch:
            raise ConfigError("with parallel.pp > 1 the pipeline splits the batch: set parallel.pp_microbatches "
                              "instead of train.micro_batch (leave it 0)")
    microbatches = p.pp_microbatches or p.pp
    if p.pp > 1 and p.pp_schedule != "gpipe" and p.pp_schedule != "1f1b" and microbatches % p.pp:
        raise ConfigError(f"parallel.pp_microbatches={microbatches} must be a multiple of parallel.pp={p.pp} "
                          f"for the {p.pp_schedule} schedule")
    degrees = {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "tp": p.tp, "pp": p.pp,
               "stages_per_rank": stages_per_rank, "microbatches": microbatches}
    if world_size is None:
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
    if cfg.optim.name == "muon" and not muon_fits(cfg, p.tp, dp):
        raise ConfigError("optim.name=muon orthogonalizes whole matrices, which tensor parallelism and FSDP split; "
                          "use parallel.zero=0 or 1 without tp, or optim.name=adamw")
    if t.global_batch % dp:
        raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by the {dp} data-parallel ranks; "
                          f"use a multiple of {dp}")
    local = t.global_batch // dp
    if t.micro_batch and local % t.micro_batch:
        raise ConfigError(f"train.micro_batch={t.micro_batch} does not divide the per-rank batch {local} "
                          f"(global_batch / {dp} data-parallel ranks)")
    if p.pp > 1:
        eval_batch = min(t.global_batch, 32)
        if local % microbatches or eval_batch % microbatches:
            raise ConfigError(f"parallel.pp_microbatches={microbatches} must divide the per-rank batch {local} and "
                              f"the evaluation batch {eval_batch}; change it or train.global_batch")
    return degrees
