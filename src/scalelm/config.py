"""Run configuration: dataclass sections, TOML files, dotted CLI overrides, validation.

Precedence, lowest first: dataclass defaults → the preset named by `model.preset` → the TOML file → dotted
flags (`--train.steps 100`). Every mistake raises `ConfigError` with one line that names the key and the fix;
the CLI prints it and exits with code 2. Torch-free, so the planner can read configs.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scalelm.model.config import ModelConfig
from scalelm.model.presets import PRESETS, get_preset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration mistake, phrased for the person who made it."""


@dataclass
class DataConfig:
    path: str | None = None
    """Prepared dataset directory (from `scalelm prepare`); None = the bundled Shakespeare, character level."""


@dataclass
class OptimConfig:
    name: Literal["auto", "adamw", "muon"] = "auto"
    """muon = torch.optim.Muon on the blocks' matrices + AdamW on embeddings, head, norms and biases; adamw = AdamW
    on everything; auto = muon where each rank holds whole matrices (one process, DDP, ZeRO-1, pipeline), adamw
    when tensor parallelism or FSDP split them (Muon orthogonalizes whole matrices). Muon reached val loss 1.53 vs
    AdamW's 1.67 after 300 steps of the default run (docs/benchmarks.md)."""
    lr: float = 3e-3
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine, linear and the decay phase of wsd)."""
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """After linear warmup: cosine or linear decay to min_lr, warmup-stable-decay, or constant."""
    warmup_steps: int = 30
    """Linear warmup from 0 to lr over these optimizer steps."""
    decay_fraction: float = 0.2
    """wsd only: share of the run spent in the final linear decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay, on matrices only (not on norms, biases or embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 = no clipping (the norm is still logged)."""
    muon_lr: float = 0.03
    """Learning rate of the Muon group (name = muon)."""


@dataclass
class TrainConfig:
    steps: int = 450
    """Optimizer steps (the most a run takes when train.time_budget_min is set)."""
    seq_len: int = 0
    """Tokens per sequence (<= model.max_seq_len); 0 = model.max_seq_len."""
    global_batch: int = 16
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    micro_batch: int = 0
    """Sequences per forward/backward on one rank; 0 = the whole local batch (no accumulation)."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision: auto = bf16 where the device runs it faster (CUDA with bf16; a CPU whose measured bf16
    matmul rate beats its fp32 one), else fp32. The run's config.toml records the dtype chosen."""
    time_budget_min: float = 0.0
    """Fit the run into this many minutes of training-loop wall time (evaluations and compilation included): after
    its first steps the run's length is fixed at the most steps that fit, at most `steps`, and kept on resume.
    0 = no budget: run `steps` steps."""
    compile: bool = False
    """torch.compile the blocks."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    eval_every: int = 100
    """Evaluate on the validation split every N steps (and at the end); 0 = only at the end."""
    eval_batches: int = 10
    """Batches of 32 validation sequences per evaluation: the same windows every time and whatever the training
    batch, so val losses compare across runs (forwarded at most global_batch sequences at a time)."""
    sample_tokens: int = 200
    """Tokens generated after each evaluation; 0 = none."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 = leave torch's default."""
    cpu_attention: Literal["auto", "sdpa"] = "auto"
    """CPU fp32 attention: auto = scalelm's kernel (model/cpu_attention.py, built on first use; RoPE applied
    inside it), where it builds; sdpa = PyTorch's scaled_dot_product_attention."""
    cpu_matmul: Literal["auto", "onednn", "blas"] = "auto"
    """CPU fp32 GEMM backend of the linear layers: oneDNN or PyTorch's BLAS; auto = the faster square matmul as
    measured on this CPU (cached with the MFU peak)."""
    keep_host_memory: bool = True
    """CPU: keep freed memory in the process for the next step instead of returning it to the OS (glibc), which
    saves re-faulting every activation each step; false leaves the system allocator as it is."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N steps (and at the end); 0 = only at the end."""
    keep: int = 2
    """How many step checkpoints to keep (the newest)."""
    resume: bool = True
    """Continue from the newest checkpoint in the run directory if there is one."""


@dataclass
class MetricsConfig:
    tensorboard: bool = False
    """Also write TensorBoard events (needs the [tb] extra)."""
    progress: bool = True
    """Show a live progress bar on the console."""


@dataclass
class ParallelConfig:
    """How ranks share the work (see docs/parallel.md). Used when the run has more than one process (torchrun);
    a single process uses only auto, hardware and activation_checkpoint. dp_replicate × dp_shard × tp × pp must
    equal the number of processes."""

    auto: bool = False
    """Ask the planner (scalelm.perf) for the fastest layout the trainer can run at this world size and use it:
    tp, pp, dp, zero, pipeline schedule and micro-batches, sequence parallel, activation checkpointing and
    train.micro_batch are chosen for you (`scalelm train --parallel auto`; needs a hardware model)."""
    hardware: str = ""
    """Hardware model for the predicted step time and memory logged by every run (and for auto): a built-in name
    (`scalelm hw list`), a TOML file, or `local`; "" = automatic: the built-in file matching the GPU's name on
    CUDA, the file `scalelm calibrate` wrote on CPU (no prediction without one)."""

    dp_replicate: int = 1
    """Data-parallel replicas (with zero >= 2: the replicate dimension of HSDP)."""
    dp_shard: int = -1
    """Data-parallel ranks that shard parameters (zero >= 2) or hold full replicas (zero 0/1); -1 = the ranks left
    after dp_replicate, tp and pp."""
    tp: int = 1
    """Tensor-parallel degree (Megatron layout); must divide heads, kv heads, the MLP width and the vocabulary."""
    pp: int = 1
    """Pipeline-parallel degree: the blocks are split into pp × pp_stages_per_rank stages."""
    zero: int = 3
    """0 = DDP all-reduce, 1 = + sharded optimizer states (ZeroRedundancyOptimizer), 2 = FSDP2 without resharding
    after forward (sharded optimizer states and gradients), 3 = FSDP2 (parameters sharded too)."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved-1f1b", "interleaved-zb", "zbv"] = "1f1b"
    """Pipeline schedule from torch.distributed.pipelining."""
    pp_microbatches: int = 0
    """Pipeline micro-batches per optimizer step; 0 = pp. Must divide the per-rank batch."""
    pp_stages_per_rank: int = 0
    """Model chunks per pipeline rank; 0 = 1 for gpipe/1f1b, 2 for interleaved-1f1b, interleaved-zb and zbv."""
    sequence_parallel: bool = False
    """With tp > 1: shard the norms' activations along the sequence (needs model.pos = rope)."""
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    """Recompute blocks in backward: full = every block, selective = every ac_every-th block."""
    ac_every: int = 2
    """selective activation checkpointing: checkpoint blocks 0, k, 2k, ..."""
    cpu_offload: bool = False
    """zero >= 2 on CUDA: keep sharded parameters, gradients and optimizer states in CPU memory (FSDP2 offload)."""
    grad_compression: Literal["none", "bf16", "powersgd"] = "none"
    """zero = 0 only: DDP communication hook that compresses gradients before the all-reduce."""
    powersgd_rank: int = 4
    """PowerSGD: rank of the low-rank gradient approximation."""
    powersgd_start_step: int = 10
    """PowerSGD: plain all-reduce for the first steps (error-feedback warm-up)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: get_preset("shakespeare-char"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1337
    """Seeds weights, data order and dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""
    out: str = "runs/latest"
    """Run directory: checkpoints, metrics.jsonl, config.toml."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = ("model", "data", "optim", "train", "checkpoint", "metrics", "parallel")
TOP_LEVEL = ("seed", "device", "out")


# ---- type coercion -------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a TOML value or CLI string into the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be None")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_txt = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, args))}{hint_txt}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r} is not a boolean; use true or false")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        try:
            number = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not an integer; write e.g. {key}=100") from None
        if number != int(number):
            raise ConfigError(f"{key}={value!r} is not an integer")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not a number; write e.g. {key}=3e-4") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__}")
        return str(value)
    return value


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def all_keys() -> list[str]:
    """Every dotted key a user may set."""
    keys = list(TOP_LEVEL)
    defaults = Config()
    for section in SECTIONS:
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(getattr(defaults, section))]
    return keys


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in table.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, name + "."))
        else:
            flat[name] = v
    return flat


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a flat {dotted key: value} dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; pass an existing .toml file to --config")
    try:
        with p.open("rb") as f:
            return _flatten(tomllib.load(f))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None


def build_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults ← preset ← file values ← overrides, then validate."""
    merged: dict[str, Any] = {}
    merged.update(file_values or {})
    merged.update(overrides or {})
    valid = all_keys()
    for key in merged:
        if key not in valid:
            raise _unknown_key(key, valid)

    cfg = Config()
    preset = merged.get("model.preset")
    if preset is not None:
        try:
            cfg.model = get_preset(str(preset))
        except KeyError as e:
            raise ConfigError(f"model.preset: {e.args[0]}") from None
    for key, value in merged.items():
        if key == "model.preset":
            continue
        if "." in key:
            section_name, name = key.split(".", 1)
            section = getattr(cfg, section_name)
        else:
            section, name = cfg, key
        setattr(section, name, _coerce(key, value, _hints(type(section))[name]))
    if cfg.train.seq_len == 0:
        cfg.train.seq_len = cfg.model.max_seq_len
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks with messages that say what to change."""
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t, o = cfg.train, cfg.optim
    for key, value in (("train.steps", t.steps), ("train.seq_len", t.seq_len), ("train.global_batch", t.global_batch),
                       ("train.log_every", t.log_every), ("train.eval_batches", t.eval_batches)):
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    for key, value in (("train.micro_batch", t.micro_batch), ("train.eval_every", t.eval_every),
                       ("train.sample_tokens", t.sample_tokens), ("checkpoint.every", cfg.checkpoint.every),
                       ("optim.warmup_steps", o.warmup_steps), ("train.threads", t.threads),
                       ("train.time_budget_min", t.time_budget_min)):
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if t.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
            f"lower train.seq_len or raise model.max_seq_len"
        )
    if t.micro_batch and t.global_batch % t.micro_batch:
        raise ConfigError(
            f"train.micro_batch={t.micro_batch} does not divide train.global_batch={t.global_batch}; "
            f"use a divisor such as {_divisors(t.global_batch)}"
        )
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be > 0")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
    if o.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
    if cfg.checkpoint.keep < 1:
        raise ConfigError(f"checkpoint.keep={cfg.checkpoint.keep} must be >= 1")
    from scalelm.layout_rules import validate_parallel  # it imports this module

    validate_parallel(cfg)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--train.steps 100`, `--train.steps=100`, `--seed 1` → {"train.steps": "100", ...} (strings; coerced later)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --train.steps 100")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and not _is_number(argv[i + 1])):
                raise ConfigError(f"--{key} needs a value, e.g. --{key} VALUE")
            value = argv[i + 1]
            i += 1
        out[key] = value
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (saved in every run directory, so a run can be repeated exactly)."""
    lines = []
    for key in TOP_LEVEL:
        lines.append(f"{key} = {_toml_value(getattr(cfg, key))}")
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = ["Config", "ConfigError", "PRESETS", "build_config", "load_toml", "parse_overrides", "to_toml"]
