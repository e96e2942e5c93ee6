"""What the perf model expects of this run, and `--parallel auto`: the trainer asks the planner.

Every run predicts, with the torch-free step model (milliseconds), the step time and peak memory of the layout it
will actually execute, and logs them next to the measured ones, so drift between model and machine is visible.
With `parallel.auto` the planner first picks that layout, among the layouts this trainer can run.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomllib

from scalelm.config import Config, ConfigError, muon_fits, resolve_optimizer, validate_parallel
from scalelm.perf.frameworks import Framework, framework_for
from scalelm.perf.hardware import Hardware, HardwareError, load_hardware, local_hardware_path
from scalelm.perf.layout import Layout
from scalelm.perf.planner import candidate_layouts
from scalelm.perf.step import GIB, StepResult, predict_memory, predict_step

PLANNED_ENV = "SCALELM_PARALLEL_PLANNED"
"""Set by `scalelm train --nproc N --parallel auto` for its ranks: the parent planned and passed explicit flags."""
MEM_HEADROOM = 0.95
"""Share of device memory a chosen layout may use (as `scalelm plan`)."""
# Substrings of torch.cuda.get_device_name() -> built-in hardware file, most specific first. Approximations:
# H100 PCIe/NVL use the SXM file; GH200 (an H100 with HBM3e) the H200 file.
GPU_NAMES = ((("GB200",), "gb200"), (("B200",), "b200"), (("H200",), "h200-141gb"), (("H100",), "h100-sxm-80gb"),
             (("A100", "40GB"), "a100-40gb"), (("A100", "80GB"), "a100-80gb"), (("A100",), "a100-unspecified"),
             (("V100",), "v100-32gb"), (("MI300X",), "mi300x"))


def match_accelerator(device_name: str) -> str | None:
    """The built-in hardware name for a CUDA device name (`NVIDIA H100 80GB HBM3` -> `h100-sxm-80gb`), or None."""
    name = device_name.upper()
    return next((key for needles, key in GPU_NAMES if all(n in name for n in needles)), None)


def _thread_mismatch(path: Path) -> str:
    """A warning when a `scalelm calibrate` file was measured with another thread count than this process
    uses (CPU speed scales with threads, so its predictions would be off), else ''."""
    try:
        with open(path, "rb") as f:
            threads = tomllib.load(f).get("calibration", {}).get("threads")
    except (OSError, ValueError):
        return ""
    import torch

    here = torch.get_num_threads()
    if threads is None or threads == here:
        return ""
    return (f"; calibrated with {threads} threads but this process uses {here}: calibrate again with "
            f"OMP_NUM_THREADS={here}")


def resolve_hardware(cfg: Config, device: Any) -> tuple[Hardware | None, str]:
    """(hardware model, note): from `parallel.hardware` (a name or TOML file; a bad one is a ConfigError), or
    automatically the built-in file matching the GPU on CUDA, the `scalelm calibrate` file on CPU. Without one:
    (None, a note saying how to get one)."""
    name = cfg.parallel.hardware
    if name:
        try:
            hw = load_hardware(name)
        except HardwareError as exc:
            raise ConfigError(f"parallel.hardware: {exc}") from None
        warning = _thread_mismatch(Path(name)) if Path(name).is_file() else ""
        if name == "local":
            warning = _thread_mismatch(local_hardware_path())
        return hw, f"hardware {hw.key}" + ("" if name == hw.key else f" from {name}") + warning
    if getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        gpu = torch.cuda.get_device_name(device)
        key = match_accelerator(gpu)
        if key is None:
            return None, f"no built-in hardware file matches GPU {gpu!r}; pass --parallel.hardware NAME|FILE"
        return load_hardware(key), f"hardware {key} (GPU {gpu})"
    path = local_hardware_path()
    if not path.exists():
        return None, f"run `scalelm calibrate` (writes {path}) or pass --parallel.hardware NAME|FILE"
    try:
        return load_hardware("local"), "hardware local" + _thread_mismatch(path)
    except HardwareError as exc:
        return None, f"the calibrated file cannot be used ({exc}); run `scalelm calibrate` again"


def checkpointed_share(cfg: Config) -> float:
    """Share of the blocks the trainer recomputes: 0 (none), 1 (full), or for its block-level "selective"
    (blocks 0, k, 2k, ...) ceil(n_layer / k) / n_layer (over the whole model, not the busiest stage)."""
    mode, n_layer = cfg.parallel.activation_checkpoint, cfg.model.n_layer
    if mode == "selective":
        return math.ceil(n_layer / cfg.parallel.ac_every) / n_layer
    return 1.0 if mode == "full" else 0.0


def perf_layout(cfg: Config, world_size: int, precision: str) -> Layout:
    """The perf-model Layout of the run the trainer will execute. One process: dp 1, zero 0. Activation
    checkpointing maps to recompute full when any block is checkpointed (predict_run interpolates the
    trainer's every-k-th-block "selective"); the perf model's "selective" (Korthikanti's) is never used."""
    t, p = cfg.train, cfg.parallel
    recompute = "full" if checkpointed_share(cfg) > 0 else "none"
    if world_size == 1:
        return Layout(zero=0, micro_batch=t.micro_batch or t.global_batch, recompute=recompute, precision=precision,
                      optimizer=resolve_optimizer(cfg))
    d = validate_parallel(cfg, world_size)
    dp, tp, pp = d["dp_replicate"] * d["dp_shard"], d["tp"], d["pp"]
    local = t.global_batch // dp
    schedule, vpp, micro_batch = "1f1b", 1, t.micro_batch or local
    if pp > 1:
        micro_batch = local // d["microbatches"]
        # interleaved-zb: torch's interleaved zero-bubble schedule also fills the bubble with weight-gradient
        # work; the perf model has no such schedule, so it is predicted as interleaved 1F1B (bubble overestimated).
        # zbv: ZB-V (Qi et al. 2024) holds 1F1B's activations with at most ZB-H1's bubble: predicted as ZB-H1
        # with two chunks per rank (for the p2p count); its bubble is an upper bound too.
        schedule, vpp = {"gpipe": ("gpipe", 1), "1f1b": ("1f1b", 1), "zbv": ("zb-h1", 2)}.get(
            p.pp_schedule, ("interleaved", d["stages_per_rank"]))
    hsdp = p.zero >= 2 and d["dp_replicate"] > 1
    zero = p.zero if dp > 1 else 0  # one data-parallel rank: neither DDP nor FSDP wraps the model
    # cpu_offload (FSDP2) moves parameters and gradients too; the perf model's offload moves the optimizer only.
    return Layout(tp=tp, pp=pp, dp=dp, dp_shard=d["dp_shard"] if hsdp else None, zero=zero, micro_batch=micro_batch,
                  vpp=vpp, schedule=schedule, sequence_parallel=p.sequence_parallel and tp > 1, recompute=recompute,
                  precision=precision, offload=p.cpu_offload and zero >= 2, optimizer=resolve_optimizer(cfg, tp, dp))


def framework(cfg: Config) -> Framework:
    """The `scalelm` framework profile, adjusted for torch.compile when train.compile is on, and without the fp32
    attention kernel where this run takes SDPA (cpu.kernels = false, tensor parallelism, dropout, sequences beyond
    its range)."""
    from scalelm.kernels.cpu.attention import MAX_SEQ  # here: the CLI imports this module and should not load torch

    fw = framework_for("scalelm torch.compile" if cfg.train.compile else "scalelm")
    kernel = (cfg.cpu.kernels and cfg.parallel.tp == 1 and cfg.model.dropout == 0.0
              and cfg.train.seq_len <= MAX_SEQ)
    return fw if kernel else replace(fw, fp32_attention_kernel=False)


def describe(lo: Layout, recompute: str = "") -> str:
    """A short layout string: `tp1 pp2 dp2, zero 3, 1f1b, micro-batch 2, recompute none`."""
    parts = [lo.short(), f"zero {lo.zero}"] + ([lo.schedule] if lo.pp > 1 else [])
    parts += [f"micro-batch {lo.micro_batch}", f"recompute {recompute or lo.recompute}"]
    return ", ".join(parts + (["sp"] if lo.sequence_parallel else []))


def predict_run(cfg: Config, world_size: int, precision: str, hw: Hardware) -> dict[str, Any]:
    """Predicted step_time_s, peak_mem_gib (per device), tokens_per_s (all devices), mfu, bottleneck, layout and
    hardware key of this run. The trainer's every-k-th-block checkpointing is interpolated between the
    predictions without and with full recompute, by the share of checkpointed blocks."""
    lo, fw, t = perf_layout(cfg, world_size, precision), framework(cfg), cfg.train

    def predict(recompute: str) -> StepResult:
        return predict_step(cfg.model, hw, replace(lo, recompute=recompute), t.seq_len, t.global_batch, fw,
                            strict=False)

    share = checkpointed_share(cfg)
    full = predict("full") if share > 0 else None
    none = predict("none") if share < 1 else None
    step_s = (1 - share) * (none.step_time_s if none else 0.0) + share * (full.step_time_s if full else 0.0)
    mem_gib = (1 - share) * (none.peak_mem_gib if none else 0.0) + share * (full.peak_mem_gib if full else 0.0)
    main = full if share >= 0.5 else none
    blocks = f"full in {round(share * cfg.model.n_layer)}/{cfg.model.n_layer} blocks" if 0 < share < 1 else ""
    return {"step_time_s": step_s, "peak_mem_gib": mem_gib, "tokens_per_s": t.global_batch * t.seq_len / step_s,
            "mfu": main.mfu * main.step_time_s / step_s, "bottleneck": main.bottleneck,
            "layout": describe(lo, blocks), "hardware": hw.key}


def _trainer_updates(lo: Layout, world_size: int, global_batch: int) -> dict[str, Any] | None:
    """The config values that make the trainer run `lo`, or None when it cannot (perf-only schedules, Korthikanti
    selective recompute, context parallel)."""
    schedules = {"1f1b": "1f1b", "gpipe": "gpipe", "interleaved": "interleaved-1f1b"}
    if lo.cp > 1 or lo.recompute == "selective" or lo.schedule not in schedules or lo.offload:
        return None
    local = global_batch // lo.dp
    return {"parallel.dp_replicate": 1, "parallel.dp_shard": lo.dp, "parallel.tp": lo.tp, "parallel.pp": lo.pp,
            # ZeRO means nothing without data parallelism; tensor parallelism needs FSDP2 wrapping (zero >= 2).
            "parallel.zero": 3 if lo.dp == 1 and lo.tp > 1 else (0 if world_size == 1 else lo.zero),
            "parallel.pp_schedule": schedules[lo.schedule], "parallel.pp_stages_per_rank": lo.vpp,
            "parallel.pp_microbatches": local // lo.micro_batch if lo.pp > 1 else 0,
            "train.micro_batch": 0 if lo.pp > 1 else lo.micro_batch,
            "parallel.sequence_parallel": lo.sequence_parallel, "parallel.activation_checkpoint": lo.recompute,
            "parallel.cpu_offload": False}


def _set(cfg: Config, updates: dict[str, Any]) -> Config:
    for key, value in updates.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _with(cfg: Config, updates: dict[str, Any]) -> Config:
    """A copy of cfg with dotted `updates` set (the sections they touch copied, the rest shared)."""
    new = copy.copy(cfg)
    new.parallel, new.train = copy.copy(cfg.parallel), copy.copy(cfg.train)
    return _set(new, updates)


def choose_layout(cfg: Config, world_size: int, precision: str, hw: Hardware) -> tuple[dict[str, Any], StepResult]:
    """The fastest layout (tokens/s, then least memory) that fits and that the trainer can run at this world
    size, as dotted config values, with its prediction. Candidates are the planner's (cp = 1), kept when they
    pass validate_parallel. Raises ConfigError when none fits."""
    t, fw = cfg.train, framework(cfg)
    budget = hw.accelerator.hbm_gib * GIB * MEM_HEADROOM
    if hw.key == "local":
        budget /= world_size  # CPU processes on one machine share its memory
    best: tuple[tuple, dict, StepResult] | None = None
    runnable, cache = 0, {}
    for lo in candidate_layouts(cfg.model, hw, world_size, t.seq_len, t.global_batch, precision, fixed={"cp": 1}):
        updates = _trainer_updates(lo, world_size, t.global_batch)
        if updates is None:
            continue
        candidate = _with(cfg, updates)
        try:
            validate_parallel(candidate, world_size)
        except ConfigError:
            continue
        optimizer = resolve_optimizer(candidate, lo.tp, lo.dp)
        if optimizer == "muon" and not muon_fits(candidate, lo.tp, lo.dp):
            continue  # an explicit optim.name=muon rules out TP and FSDP layouts
        lo = replace(lo, optimizer=optimizer)
        runnable += 1
        m = t.global_batch // (lo.dp * lo.micro_batch)
        if predict_memory(cfg.model, hw, lo, fw, t.seq_len, m).total > budget:
            continue
        res = predict_step(cfg.model, hw, lo, t.seq_len, t.global_batch, fw, strict=False, cache=cache)
        rank = (-res.tokens_per_s_per_device, res.peak_mem_gib)
        if best is None or rank < best[0]:
            best = (rank, updates, res)
    if best is None:
        why = (f"none of the {runnable} layouts the trainer can run fits in {budget / GIB:.1f} GiB per device"
               if runnable else "the trainer can run no layout of this model and batch")
        raise ConfigError(f"parallel.auto: {why} on {world_size} x {hw.key}; lower train.global_batch or "
                          f"train.seq_len, change the process count or pass another --parallel.hardware")
    return best[1], best[2]


def apply_layout(cfg: Config, updates: dict[str, Any], world_size: int) -> None:
    """Write a chosen layout into cfg (so config.toml records it) and validate it."""
    validate_parallel(_set(cfg, updates), world_size)


def _auto(cfg: Config, world_size: int, precision: str, hw: Hardware | None, note: str) -> tuple[dict, StepResult]:
    if hw is None:
        raise ConfigError(f"parallel.auto needs a hardware model: {note}")
    updates, result = choose_layout(cfg, world_size, precision, hw)
    apply_layout(cfg, updates, world_size)
    return updates, result


@dataclass
class Forecast:
    """The prediction a run logs (None with a note when there is no hardware model or the model failed)."""

    prediction: dict[str, Any] | None
    note: str
    auto: bool

    def record(self) -> dict[str, Any]:
        """The first metrics line: {"event": "plan", ...}."""
        p = self.prediction or {}
        out = {"event": "plan", "hardware": p.get("hardware"), "layout": p.get("layout"),
               "predicted_step_time_s": p.get("step_time_s"), "predicted_peak_mem_gib": p.get("peak_mem_gib"),
               "predicted_tokens_per_s": p.get("tokens_per_s"), "auto": self.auto}
        return out if self.prediction else dict(out, note=self.note)

    def line(self) -> str:
        p = self.prediction
        if p is None:
            return f"plan: no prediction ({self.note})"
        return (f"plan ({self.note}{', auto' if self.auto else ''}): {p['layout']}; predicted {p['step_time_s']:.3g} "
                f"s/step, {p['peak_mem_gib']:.3g} GiB peak per device, bottleneck {p['bottleneck']}")


def prepare_forecast(cfg: Config, device: Any, world_size: int, precision: str) -> Forecast:
    """Resolve the hardware, apply parallel.auto (ConfigError when it cannot), then predict the run. Only a bad
    explicit parallel.hardware or an impossible auto raises; a failure of the perf model becomes the note."""
    hw, note = resolve_hardware(cfg, device)
    if cfg.parallel.auto and not os.environ.get(PLANNED_ENV):
        _auto(cfg, world_size, precision, hw, note)
    if world_size > 1:
        validate_parallel(cfg, world_size)  # a layout mistake is a ConfigError, not a failed forecast
    if hw is None:
        return Forecast(None, f"no hardware model: {note}", cfg.parallel.auto)
    try:
        return Forecast(predict_run(cfg, world_size, precision, hw), note, cfg.parallel.auto)
    except Exception as exc:  # a forecast must never stop a run
        return Forecast(None, f"the perf model failed: {type(exc).__name__}: {exc}", cfg.parallel.auto)


def launch_flags(cfg: Config, world_size: int) -> tuple[list[str], str]:
    """For `scalelm train --nproc N --parallel auto`: plan once in the parent; returns the explicit flags for the
    ranks and a line to print. Imports torch (device and precision are resolved as the ranks will)."""
    from scalelm.train.device import resolve_device
    from scalelm.train.precision import resolve_precision

    device = resolve_device(cfg.device)
    try:
        precision = resolve_precision(cfg.train.dtype, device).name
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    hw, note = resolve_hardware(cfg, device)
    updates, res = _auto(cfg, world_size, precision, hw, note)
    flags = [x for key, value in updates.items()
             for x in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))]
    return flags, f"parallel auto ({note}): {describe(res.layout)} -> {' '.join(flags)}"
