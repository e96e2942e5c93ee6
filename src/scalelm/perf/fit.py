"""The fitted knobs and leave-one-source-out cross-validation (`scalelm plan evaluate FILE --cv source`).

Everything in the step model is a data-sheet number, a published kernel benchmark, or a stated framework fact,
except three factors shared by every device (hardware.FIT_KNOBS): the share of its stand-alone benchmark speed a
GEMM, a fused attention kernel and an elementwise kernel keep inside a training step. They are fitted to the
published runs by minimizing the mean |log(predicted / measured)| (robust to a few far-off runs).

Each run's step has a part that scales as 1/knob per kernel class (StepResult.sensitivity_s), so around knobs k0
step(k) = step0 + sum_c s_c·(k0_c/k_c - 1): the search runs on that, and a few rounds of exact re-prediction around
the latest knobs make it exact. The runs of the left-out source are then
predicted exactly with the knobs fitted without them, and their errors are the cross-validated errors; the same
errors, pooled by device family and parallel style, give the 80% intervals (uncertainty.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from scalelm.perf.evaluate import THROUGHPUT, RowResult, attach_intervals, evaluate_row, read_rows, summarize
from scalelm.perf.hardware import FIT_KNOBS, fitted_knobs
from scalelm.perf.uncertainty import Residual

GRID = (0.2, 1.6, 0.02)
"""Coarse search range and step of each knob; the best coarse value is then refined to 0.001."""


def _objective(rows: list[RowResult], base: dict[str, float], knobs: dict[str, float]) -> float:
    total = 0.0
    for r in rows:
        step = r.step_time_s + sum(s * (base[k] / knobs[k] - 1.0) for k, s in r.sensitivity_s.items())
        if step <= 0:
            return math.inf
        total += abs(math.log(r.predicted * r.step_time_s / step / r.measured))
    return total / max(1, len(rows))


def _line_search(rows: list[RowResult], base: dict[str, float], knobs: dict[str, float], name: str) -> float:
    def cost(v: float) -> float:
        return _objective(rows, base, dict(knobs, **{name: v}))

    lo, hi, step = GRID
    coarse = [lo + i * step for i in range(int(round((hi - lo) / step)) + 1)]
    best = min(coarse, key=cost)
    fine = [best + (i - 20) * 0.001 for i in range(41) if best + (i - 20) * 0.001 > 0]
    return round(min(fine, key=cost), 4)


def _fit_linear(results: list[RowResult], base: dict[str, float], sweeps: int = 3) -> dict[str, float]:
    rows = [r for r in results if r.error_pct is not None and r.sensitivity_s and r.step_time_s]
    knobs = dict(base)
    for _ in range(sweeps):
        for name in FIT_KNOBS:
            if any(r.sensitivity_s.get(name, 0.0) > 0 for r in rows):
                knobs[name] = _line_search(rows, base, knobs, name)
    return knobs


def fit_knobs(rows: list[dict], results: list[RowResult] | None = None, rounds: int = 3) -> dict[str, float]:
    """Knobs minimizing the mean |log error| over `rows` (a knob no run depends on keeps its shipped value).

    Each round fits on the first-order model around the current knobs (coordinate descent), then predicts the rows
    exactly with the new knobs and fits again around them, until the knobs stop moving. `results`: the rows already
    predicted with the shipped knobs (saves the first pass)."""
    knobs = fitted_knobs()
    results = results if results is not None else [evaluate_row(r, THROUGHPUT) for r in rows]
    for i in range(rounds):
        new = _fit_linear(results, knobs)
        if all(abs(new[k] - knobs[k]) < 5e-4 for k in knobs):
            return new
        knobs = new
        if i < rounds - 1:
            results = [evaluate_row(r, THROUGHPUT, knobs) for r in rows]
    return knobs


def cross_validate(rows: list[dict], kind: str = THROUGHPUT) -> tuple[list[RowResult], dict, dict[str, dict]]:
    """Leave-one-source-out: for each source, refit the knobs on the others and predict its runs. Returns the
    left-out results (each with the 80% interval from the other sources' cross-validated errors), the summary and
    the knobs of each fold."""
    first = [evaluate_row(r, kind) for r in rows]
    sources = sorted({r.source for r in first})
    folds: dict[str, dict] = {}
    out: list[RowResult] = list(first)
    if kind == THROUGHPUT:
        for src in sources:
            train = [(row, r) for row, r in zip(rows, first) if r.source != src]
            knobs = fit_knobs([row for row, _ in train], [r for _, r in train])
            folds[src] = knobs
            for i, (row, r) in enumerate(zip(rows, first)):
                if r.source == src:
                    out[i] = evaluate_row(row, kind, knobs)
    # Each run's interval comes from the errors of the other sources only, as it would for a new source.
    for src in sources:
        pool = residual_table([r for r in out if r.source != src])
        attach_intervals([r for r in out if r.source == src], pool)
    return out, summarize(out), folds


def residual_table(results: list[RowResult]) -> list[Residual]:
    """(group, source, error %) of each predicted run: the pools intervals are read from."""
    return [(r.group, r.source, round(r.error_pct, 2)) for r in results if r.error_pct is not None]


def write_fit(path: str | Path, rows: list[dict], cv_results: list[RowResult]) -> dict[str, float]:
    """Fit the knobs on all rows and write them with the cross-validated errors (the shipped fit.toml)."""
    first = [evaluate_row(r, THROUGHPUT) for r in rows]
    knobs = fit_knobs(rows, first)
    sources = sorted({r.source for r in first if r.error_pct is not None})
    used = sum(r.error_pct is not None for r in first)
    lines = ["# Written by `scalelm plan evaluate RUNS --cv source --write-fit`: the fitted knobs (hardware.FIT_KNOBS)",
             f"# on {used} runs from {len(sources)} sources, and their leave-one-source-out errors (%) by group.",
             "", "[knobs]"]
    lines += [f"{k} = {v}" for k, v in knobs.items()]
    lines += ["", "[fit]", f"runs = {used}", "sources = [" + ", ".join(_quote(s) for s in sources) + "]"]
    pools: dict[tuple[str, str], list[float]] = {}
    for group, src, err in residual_table(cv_results):
        pools.setdefault((group, src), []).append(err)
    for (group, src), errs in sorted(pools.items()):
        lines += ["", "[[residuals]]", f"group = {_quote(group)}", f"source = {_quote(src)}",
                  "errors = [" + ", ".join(f"{e:g}" for e in errs) + "]"]
    Path(path).write_text("\n".join(lines) + "\n")
    return knobs


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cross_validate_file(path: str | Path) -> tuple[str, list[dict], list[RowResult], dict, dict[str, dict]]:
    kind, rows = read_rows(path)
    results, summary, folds = cross_validate(rows, kind)
    return kind, rows, results, summary, folds
