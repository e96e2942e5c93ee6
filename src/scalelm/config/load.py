"""Build a Config: TOML files, dotted CLI overrides, type coercion, validation; and write it back as TOML.

Precedence, lowest first: dataclass defaults → the preset named by `model.preset` → the TOML file → dotted
flags (`--train.steps 100`). Every mistake raises `ConfigError` with one line that names the key and the fix;
the CLI prints it and exits with code 2. Torch-free, so the planner can read configs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import tomli_w

from scalelm.config.layout import validate_parallel
from scalelm.config.sections import SECTIONS, TOP_LEVEL, Config, ConfigError
from scalelm.model.presets import get_preset
from scalelm.usage import is_number

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RENAMED = {"train.cpu_matmul": "cpu.matmul", "train.keep_host_memory": "cpu.keep_host_memory"}
"""Keys that moved to another section: config files written by earlier versions still load."""


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
        if not math.isfinite(number) or number != int(number):
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


def _is_bool(hint: Any) -> bool:
    """bool, or bool | None."""
    if hint is bool:
        return True
    args = typing.get_args(hint)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return union and bool in args and all(a in (bool, type(None)) for a in args)


def bool_keys() -> frozenset[str]:
    """Dotted keys whose field is a boolean (from the dataclasses' type hints), so the command line can take
    `--KEY` / `--no-KEY` without a value; renamed keys are included under their old names too."""
    defaults = Config()
    top = _hints(Config)
    keys = {key for key in TOP_LEVEL if _is_bool(top[key])}
    for section in SECTIONS:
        obj = getattr(defaults, section)
        hints = _hints(type(obj))
        keys |= {f"{section}.{f.name}" for f in dataclasses.fields(obj) if _is_bool(hints[f.name])}
    return frozenset(keys | {old for old, new in RENAMED.items() if new in keys})


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


def _renamed(values: dict[str, Any]) -> dict[str, Any]:
    """Values under their current keys (RENAMED; `train.cpu_attention = sdpa` meant `cpu.kernels = false`)."""
    out = {RENAMED.get(k, k): v for k, v in values.items() if k != "train.cpu_attention"}
    if "train.cpu_attention" in values:
        out["cpu.kernels"] = str(values["train.cpu_attention"]) != "sdpa"
    return out


def build_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults ← preset ← file values ← overrides, then validate."""
    merged: dict[str, Any] = {}
    merged.update(_renamed(file_values or {}))
    merged.update(_renamed(overrides or {}))
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
    elif "model.preset" in merged:
        cfg.model.preset = None  # a model given key by key (an --init-from source's), no preset behind it
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
                       ("train.time_budget_min", t.time_budget_min),
                       ("train.max_nonfinite_steps", t.max_nonfinite_steps)):
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
    if not cfg.parallel.timeout_s > 0 or cfg.parallel.timeout_s == float("inf"):
        raise ConfigError(f"parallel.timeout_s={cfg.parallel.timeout_s} must be a positive number of seconds")
    if cfg.lora.rank < 0 or (cfg.lora.rank and cfg.lora.alpha <= 0):
        raise ConfigError(f"lora.rank={cfg.lora.rank} must be >= 0 and lora.alpha={cfg.lora.alpha} > 0")
    if cfg.lora.rank and not cfg.init_from:
        raise ConfigError("lora.rank needs --init-from RUN_OR_HF_DIR: LoRA adapts the weights of an existing model")
    if cfg.lora.rank and cfg.optim.name == "muon":
        raise ConfigError("LoRA adapters train with AdamW; use --optim.name adamw (or auto)")
    validate_parallel(cfg)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--train.steps 100`, `--train.steps=100`, `--seed 1` → {"train.steps": "100", ...} (strings; coerced later).
    Boolean keys also take `--train.compile` (true) and `--no-train.compile` (false) without a value; a value
    that follows (`--train.compile false`) is still read as the value. Negative numbers are values."""
    out: dict[str, Any] = {}
    booleans = bool_keys()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; options look like --train.steps 100")
        key = arg[2:]
        if key.startswith("no-"):
            name = key[3:]
            if "=" in name:
                name = name.split("=", 1)[0]
                raise ConfigError(f"{arg} takes no value; write --no-{name}, or --{name} true|false")
            if name not in booleans:
                valid = all_keys()
                if name not in valid and name not in RENAMED:
                    raise _unknown_key(name, valid)
                raise ConfigError(f"--no-{name}: only boolean keys take --no-, and {name} is not one; "
                                  f"set it with --{name} VALUE")
            out[name] = "false"
            i += 1
            continue
        name, eq, rest = key.partition("=")
        if "." not in name:
            key = name.replace("-", "_") + eq + rest  # top-level keys as flags: --init-from sets init_from
        if "=" in key:
            key, value = key.split("=", 1)
        elif key in booleans and (i + 1 >= len(argv) or _is_option(argv[i + 1])):
            value = "true"  # `--train.compile` alone
        else:
            if i + 1 >= len(argv) or _is_option(argv[i + 1]):
                raise ConfigError(f"--{key} needs a value, e.g. --{key} VALUE")
            value = argv[i + 1]
            i += 1
        out[key] = value
        i += 1
    return out


def _is_option(text: str) -> bool:
    """`--something` that is not a negative number (`--1` is no key either way)."""
    return text.startswith("--") and not is_number(text)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (saved in every run directory, so a run can be repeated exactly)."""
    table: dict[str, Any] = {key: getattr(cfg, key) for key in TOP_LEVEL}
    for section in SECTIONS:  # TOML has no null: unset optional fields are left out and read back as None
        table[section] = {k: v for k, v in dataclasses.asdict(getattr(cfg, section)).items() if v is not None}
    return tomli_w.dumps(table)
