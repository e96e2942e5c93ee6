"""80% intervals for predictions, from the cross-validated errors of comparable published runs.

A prediction's interval is read off the leave-one-source-out errors (fit.py) of runs like it: same device family
and parallel style when such runs are enough (MIN_RUNS from MIN_SOURCES sources), else the same device family, else
all runs. With error e = (predicted - measured) / measured and q the 80th percentile of |e| over that pool, the
measured value lies in [p / (1 + q), p / (1 - q)]. `scalelm plan evaluate --cv source` reports how often it does
(calibration); fit.toml ships the errors of the development runs for `plan` and plain `evaluate`.
"""

from __future__ import annotations

import tomllib

from scalelm.perf.hardware import FIT_PATH
from scalelm.perf.layout import Layout

MIN_RUNS = 10
"""Fewest errors an interval is read from; a smaller pool falls back to the wider one."""
MIN_SOURCES = 2
COVERAGE = 0.80

_FAMILIES = (("a100", "ampere"), ("h100", "hopper"), ("h200", "hopper"), ("gb200", "blackwell"),
             ("b200", "blackwell"), ("v100", "volta"), ("mi300", "cdna3"), ("tpu", "tpu"))


def device_family(gpu: str) -> str:
    """Accelerator generation of a hardware key (`h100-sxm-80gb` -> hopper); other keys stand for themselves."""
    g = gpu.lower()
    return next((fam for prefix, fam in _FAMILIES if g.startswith(prefix)), g)


def parallel_style(lo: Layout) -> str:
    """`fsdp` (ZeRO-3 without model parallelism), `model-parallel` (tp or pp > 1) or `data-parallel`."""
    if lo.tp > 1 or lo.pp > 1:
        return "model-parallel"
    return "fsdp" if lo.zero == 3 else "data-parallel"


def group_key(gpu: str, lo: Layout) -> str:
    return f"{device_family(gpu)}/{parallel_style(lo)}"


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


Residual = tuple[str, str, float]
"""(group, source, error %) of one cross-validated run."""


def comparable(residuals: list[Residual], key: str) -> tuple[list[float], str]:
    """Errors of the runs comparable to group `key` ("family/style") and the pool they came from: the same group,
    else the same device family, else all runs -- the first pool with MIN_RUNS runs from MIN_SOURCES sources (an
    interval must hold for a new source, so the errors of one source alone do not make it)."""
    family = key.split("/")[0]
    for name, keep in ((key, lambda g: g == key), (family, lambda g: g.split("/")[0] == family),
                       ("all", lambda g: True)):
        pool = [(src, e) for g, src, e in residuals if keep(g)]
        if len(pool) >= MIN_RUNS and len({src for src, _ in pool}) >= MIN_SOURCES:
            return [e for _, e in pool], name
    return [e for _, _, e in residuals], "all"


def interval(predicted: float, residuals: list[Residual], key: str) -> tuple[float, float, str, int] | None:
    """(low, high, pool used, runs) of the 80% interval of the measured value, or None without residuals. The
    half-width is the 80th percentile of |error| of the pool, applied both ways: with few sources the sign of the
    error is a property of the source more than of the model."""
    errs, used = comparable(residuals, key)
    if len(errs) < 2:
        return None
    q = min(0.95, quantile([abs(e) for e in errs], COVERAGE) / 100.0)
    return predicted / (1 + q), predicted / (1 - q), used, len(errs)


_SHIPPED: list[Residual] | None = None


def shipped_residuals() -> list[Residual]:
    """Leave-one-source-out errors (%) of the development runs, as fit.toml stores them."""
    global _SHIPPED
    if _SHIPPED is None:
        with open(FIT_PATH, "rb") as f:
            table = tomllib.load(f).get("residuals", [])
        _SHIPPED = [(t["group"], t["source"], float(e)) for t in table for e in t["errors"]]
    return _SHIPPED
