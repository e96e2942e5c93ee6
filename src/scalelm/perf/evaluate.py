"""`scalelm plan evaluate RUNS.csv`: predict published runs and report the error.

Reads the runs schema (throughput: `tokens_per_s_per_gpu`) or the memory schema (`peak_mem_gib` with
`mem_kind`) of the shared published-run data (SCHEMA.md; column names kept). Each row becomes a
ModelConfig, a Hardware (the row's `gpu`, `inter_node`, `gpus_per_node`), a Layout and a framework
profile; empty optional columns take the profile's documented defaults (frameworks.py). Nothing here
looks at a row's id, model name or target: the prediction uses only the run's description.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from scalelm.model.config import ModelConfig
from scalelm.perf.accounting import megatron_memory
from scalelm.perf.frameworks import Features, Framework, framework_from
from scalelm.perf.hardware import Hardware, HardwareError, load_hardware
from scalelm.perf.layout import Layout
from scalelm.perf.memory import ALLOCATOR_MARGIN, RESERVED_OVER_ALLOCATED
from scalelm.perf.step import predict_memory, predict_step
from scalelm.perf.uncertainty import group_key, interval, shipped_residuals

THROUGHPUT, MEMORY = "tokens_per_s_per_gpu", "peak_mem_gib"


class RowError(ValueError):
    """A row the model cannot predict; the message is the reason listed in the output."""


def _int(row: dict, key: str, default=None):
    v = (row.get(key) or "").strip()
    if not v:
        if default is None:
            raise RowError(f"column {key!r} is empty and has no default")
        return default
    try:
        return int(float(v))
    except ValueError:
        raise RowError(f"column {key!r} = {v!r} is not a number") from None


def row_model(row: dict) -> ModelConfig:
    """Model shape of a row. head_dim = hidden/n_heads unless a `head_dim` column says otherwise; PaLM
    uses 256 (SCHEMA.md documents this exception)."""
    h, nh = _int(row, "hidden"), _int(row, "n_heads")
    mlp = (row.get("mlp") or "gelu").strip()
    head_dim = _int(row, "head_dim", 0) or (256 if "palm" in (row.get("model") or "").lower() else None)
    cfg = ModelConfig(vocab_size=_int(row, "vocab"), n_layer=_int(row, "n_layers"), n_head=nh,
                      n_kv_head=_int(row, "n_kv_heads", nh), d_model=h, head_dim=head_dim,
                      d_ff=_int(row, "ffn_hidden", 4 * h), max_seq_len=_int(row, "seq_len"),
                      pos="rope" if mlp == "swiglu" else "sinusoidal",
                      norm="rmsnorm" if mlp == "swiglu" else "layernorm", mlp=mlp, bias=False,
                      tie_embeddings=bool(_int(row, "tied_embeddings", 0)))
    if mlp not in ("gelu", "swiglu"):
        raise RowError(f"mlp={mlp!r} is not gelu or swiglu")
    return cfg


FEATURE_COLUMNS = ("framework_name", "framework_year", "distributed_optimizer", "flash_attention", "compile",
                   "fp8_recipe", "tp_overlap", "dp_overlap", "pp_overlap", "activation_offload", "reshard_after_forward")
"""Optional structured columns describing the software (frameworks.Features); an empty or missing column falls back
to what the free-text `framework` column implies, then to the profile's default."""


def _flag(row: dict, key: str) -> bool | None:
    v = (row.get(key) or "").strip().lower()
    if not v:
        return None
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise RowError(f"column {key!r} = {v!r} is not 0/1")


def row_features(row: dict) -> Features:
    """The structured software columns of a row (None where empty or absent)."""
    zero = _int(row, "zero", -1)
    return Features(name=(row.get("framework_name") or "").strip() or None,
                    year=_int(row, "framework_year", 0) or None,
                    distributed_optimizer=_flag(row, "distributed_optimizer"), zero=zero if zero >= 0 else None,
                    flash_attention=_flag(row, "flash_attention"), compile=_flag(row, "compile"),
                    fp8_recipe=(row.get("fp8_recipe") or "").strip().lower() or None,
                    tp_overlap=_flag(row, "tp_overlap"), dp_overlap=_flag(row, "dp_overlap"),
                    pp_overlap=_flag(row, "pp_overlap"), activation_offload=_flag(row, "activation_offload"),
                    reshard_after_forward=_flag(row, "reshard_after_forward"))


def row_software(row: dict) -> tuple[Framework, Features, list[str]]:
    """Profile, features (structured columns first, free text second) and warnings of a row."""
    try:
        return framework_from(row.get("framework") or row.get("source") or "", row_features(row))
    except ValueError as exc:
        raise RowError(str(exc)) from None


def row_framework(row: dict) -> Framework:
    return row_software(row)[0]


def row_hardware(row: dict) -> Hardware:
    try:
        hw = load_hardware((row.get("gpu") or "").strip() or "?")
        inter = (row.get("inter_node") or "").strip() or None
        gpn = _int(row, "gpus_per_node", 0) or None
        n = _int(row, "n_gpus", 0)
        if gpn is None and n:
            gpn = min(n, hw.node.gpus_per_node)
        return hw.with_network(inter, gpn)
    except HardwareError as exc:
        raise RowError(str(exc)) from None


def row_layout(row: dict, fw: Framework, cfg: ModelConfig, feats: Features | None = None) -> tuple[Layout, int, int]:
    """(layout, global batch, seq_len) with framework defaults for empty optional columns. An empty `zero` takes the
    stage the software features state (a ZeRO stage in the text, or distributed_optimizer 0/1), else the default."""
    d = fw.defaults
    feats = feats or Features()
    tp, pp, cp = _int(row, "tp", 1), _int(row, "pp", 1), _int(row, "cp", d.get("cp", 1))
    n = _int(row, "n_gpus")
    dp = _int(row, "dp", 0) or n // (tp * pp * cp)
    if dp * tp * pp * cp != n:
        raise RowError(f"dp*tp*pp*cp = {dp}*{tp}*{pp}*{cp} != n_gpus = {n}")
    vpp = _int(row, "vpp", d.get("vpp", 1))
    sp_default = d.get("sequence_parallel", "tp>1")
    sp = _int(row, "sequence_parallel", -1)
    sp = (tp > 1) if sp < 0 and sp_default == "tp>1" else bool(sp > 0)
    gbs = _int(row, "global_batch_seqs")
    mb = _int(row, "micro_batch", 0) or d.get("micro_batch", 1)
    recompute = (row.get("recompute") or "").strip() or d.get("recompute", "none")
    precision = (row.get("precision") or "bf16").strip()
    zero = feats.zero
    if zero is None and feats.distributed_optimizer is not None:
        zero = 1 if feats.distributed_optimizer else 0
    if zero is None:
        zero = d.get("zero", 0)
    lo = Layout(tp=tp, pp=pp, dp=dp, cp=cp, zero=zero, micro_batch=mb, vpp=vpp,
                schedule="interleaved" if vpp > 1 else "1f1b", sequence_parallel=sp and tp > 1,
                recompute=recompute, flash_attention=fw.flash_attention, precision=precision)
    return lo, gbs, _int(row, "seq_len")


@dataclass
class RowResult:
    id: str
    predicted: float | None
    measured: float | None
    error_pct: float | None
    bottleneck: str | None
    reason: str | None = None
    extra: dict | None = None
    source: str = ""
    """The run's `source` (its `group` where that is empty): the unit left out by cross-validation."""
    group: str = ""
    """device family / parallel style (uncertainty.group_key), the pool its interval is read from."""
    sensitivity_s: dict | None = None
    step_time_s: float | None = None
    interval: tuple[float, float, str, int] | None = None


def row_source(row: dict) -> str:
    return (row.get("source") or "").strip() or (row.get("group") or "").strip() or "unknown"


def evaluate_row(row: dict, kind: str, knobs: dict[str, float] | None = None) -> RowResult:
    """Predict one run. `knobs` replaces the fitted in-step efficiencies (fit.toml) for this prediction."""
    rid = row.get("id", "?")
    try:
        measured = float(row[kind]) if (row.get(kind) or "").strip() else None
        if measured is None or measured <= 0:
            raise RowError(f"no measured {kind}")
        cfg = row_model(row)
        fw, feats, warnings = row_software(row)
        hw = row_hardware(row)
        if knobs is not None:
            hw = hw.refit(knobs)
        lo, gbs, seq = row_layout(row, fw, cfg, feats)
        sens = step_s = None
        if kind == THROUGHPUT:
            res = predict_step(cfg, hw, lo, seq, gbs, fw, strict=False)
            # The run ran, so memory capacity did not stop it: name what limits its time, and report a
            # predicted peak above (or near) the device's memory separately, as a miss of the memory model.
            pred, bottleneck = res.tokens_per_s_per_device, res.time_bottleneck
            sens, step_s = res.sensitivity_s, res.step_time_s
            extra = {"predicted_step_time_s": round(res.step_time_s, 4), "layout": lo.short(),
                     "framework_profile": fw.name, "predicted_peak_mem_gib": round(res.peak_mem_gib, 2),
                     "memory_capacity_gib": hw.accelerator.hbm_gib}
            note = memory_note(res.peak_mem_gib, hw.accelerator.hbm_gib)
            if note:
                extra["memory_note"] = note
        else:
            m = max(1, math.ceil(gbs / (lo.dp * lo.micro_batch)))
            mem = predict_memory(cfg, hw, lo, fw, seq, m)
            # A measured peak is what PyTorch's allocator reports: allocated = live tensors; reserved adds the
            # fragmentation margin and the pool the caching allocator keeps on top.
            pred = mem.allocated / 2.0**30
            if (row.get("mem_kind") or "allocated").strip() == "reserved":
                pred *= (1 + ALLOCATOR_MARGIN) * RESERVED_OVER_ALLOCATED
            bottleneck = None
            extra = {"mem_kind": row.get("mem_kind"), "breakdown_gib": mem.gib(), "framework_profile": fw.name}
            if fw.name.startswith("megatron"):
                theory = megatron_memory(cfg, lo.tp, lo.pp, lo.dp * lo.cp, lo.zero >= 1, seq, lo.micro_batch,
                                         lo.vpp if lo.vpp > 1 else None, m, lo.sequence_parallel, lo.recompute)
                extra["megatron_theoretical_gib"] = round((theory.total or theory.weight_and_optimizer) / 2.0**30, 2)
        if warnings:
            extra["framework_warning"] = "; ".join(warnings)
        err = 100.0 * (pred - measured) / measured
        return RowResult(rid, pred, measured, err, bottleneck, None, extra, row_source(row),
                         group_key(hw.key, lo), sens, step_s)
    except (RowError, KeyError, ValueError, ZeroDivisionError) as exc:
        meas = row.get(kind)
        return RowResult(rid, None, float(meas) if meas and _isnum(meas) else None, None, None, str(exc),
                         source=row_source(row))


NEAR_CAPACITY = 0.95
"""A predicted peak above this share of device memory is reported as near capacity (the planner's fit limit)."""


def memory_note(peak_gib: float, capacity_gib: float) -> str | None:
    """For a run that ran: say when the predicted peak exceeds, or nearly reaches, the device memory."""
    share = peak_gib / capacity_gib
    if share > 1:
        return (f"over capacity: predicted peak {peak_gib:.1f} GiB > {capacity_gib:g} GiB (+{100 * (share - 1):.1f}%); "
                "the run fit, so the memory model overestimates it")
    if share >= NEAR_CAPACITY:
        return f"near capacity: predicted peak {peak_gib:.1f} of {capacity_gib:g} GiB ({100 * share:.0f}%)"
    return None


def _isnum(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def detect_kind(header: list[str]) -> str:
    if THROUGHPUT in header:
        return THROUGHPUT
    if MEMORY in header:
        return MEMORY
    raise RowError(f"the file has neither a {THROUGHPUT} nor a {MEMORY} column; see SCHEMA.md for the schemas")


def summarize(results: list[RowResult]) -> dict:
    errs = [abs(r.error_pct) for r in results if r.error_pct is not None]
    if not errs:
        return {"rows": len(results), "predicted": 0}
    out = {
        "rows": len(results),
        "predicted": len(errs),
        "median_abs_error_pct": round(statistics.median(errs), 2),
        "mean_abs_error_pct": round(statistics.fmean(errs), 2),
        "within_10pct": round(sum(e <= 10 for e in errs) / len(errs), 4),
        "within_20pct": round(sum(e <= 20 for e in errs) / len(errs), 4),
        "mean_error_pct": round(statistics.fmean(r.error_pct for r in results if r.error_pct is not None), 2),
    }
    covered = [r.interval[0] <= r.measured <= r.interval[1] for r in results
               if r.interval is not None and r.error_pct is not None]
    if covered:
        out["interval_coverage_80"] = round(sum(covered) / len(covered), 4)
        out["intervals"] = len(covered)
    return out


def read_rows(path: str | Path) -> tuple[str, list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        kind = detect_kind(reader.fieldnames or [])
        return kind, list(reader)


def attach_intervals(results: list[RowResult], residuals: list) -> None:
    """Set each predicted result's 80% interval from `residuals` ((group, source, error %) of comparable runs)."""
    for r in results:
        if r.predicted is not None:
            r.interval = interval(r.predicted, residuals, r.group)


def evaluate_file(path: str | Path) -> tuple[str, list[RowResult], dict]:
    """Predict every row with the shipped knobs; throughput rows get intervals from the shipped CV errors."""
    kind, rows = read_rows(path)
    results = [evaluate_row(r, kind) for r in rows]
    if kind == THROUGHPUT:
        attach_intervals(results, shipped_residuals())
    return kind, results, summarize(results)


def to_json(kind: str, results: list[RowResult], summary: dict) -> dict:
    pk, mk = (("predicted_tokens_per_s_per_gpu", "measured_tokens_per_s_per_gpu") if kind == THROUGHPUT
              else ("predicted_peak_mem_gib", "measured_peak_mem_gib"))
    rows = []
    for r in results:
        d = {"id": r.id, pk: None if r.predicted is None else round(r.predicted, 3), mk: r.measured,
             "error_pct": None if r.error_pct is None else round(r.error_pct, 2), "bottleneck": r.bottleneck,
             "source": r.source}
        if r.reason:
            d["reason"] = r.reason
        if r.interval is not None:
            lo, hi, used, n = r.interval
            d["interval_80"] = [round(lo, 3), round(hi, 3)]
            d["interval_from"] = f"{used} ({n} runs)"
        if r.extra:
            d.update(r.extra)
        rows.append(d)
    return {"kind": "throughput" if kind == THROUGHPUT else "memory", "rows": rows, "summary": summary}
