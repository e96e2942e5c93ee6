"""Pipeline schedules: bubble fractions, activation in-flight counts, and a timeline for plots.

With p stages, m micro-batches, per-micro-batch forward t_f and backward t_b on one stage:

* GPipe (Huang et al. 2019) and 1F1B (PipeDream-Flush, Narayanan et al. 2021): bubble (p-1)·(t_f+t_b),
  i.e. a fraction (p-1)/m of the ideal time m·(t_f+t_b). GPipe stores all m micro-batches' activations;
  1F1B at most p (Narayanan 2021 sec. 2.2).
* Interleaved 1F1B with v model chunks per rank (Narayanan 2021 sec. 2.2.2): bubble (p-1)/(v·m); the
  first stage holds activations of L·(1 + (p-1)/(p·v)) layers (Korthikanti 2022 sec. 4.2.3) -- we use the
  factor 1 + (p-1)/(p·v) on top of 1F1B's p in-flight micro-batches.
* Zero bubble (Qi et al. 2024): splitting the backward into input-grad B and weight-grad W lets W fill the
  bubble; ZB-H1 cuts 1F1B's bubble to (p-1)·(t_f + t_b - t_w) with 1F1B's memory, ZB-H2 to ~0 with
  about twice the in-flight activations. We take t_w = t_b/2 (the weight-gradient GEMMs are half the backward).
"""

from __future__ import annotations

SCHEDULES = ("1f1b", "interleaved", "gpipe", "zb-h1", "zb-h2")


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Idle time of a stage as a fraction of its busy time m·(t_f + t_b), with t_b = 2·t_f."""
    if p <= 1:
        return 0.0
    if schedule in ("1f1b", "gpipe"):
        return (p - 1) / m
    if schedule == "interleaved":
        return (p - 1) / (v * m)
    if schedule == "zb-h1":
        # (p-1)(t_f + t_b - t_w) with t_b = 2 t_f, t_w = t_f: (p-1)·2t_f over m·3t_f.
        return (p - 1) * 2 / (3 * m)
    if schedule == "zb-h2":
        return 0.0
    raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def in_flight_microbatches(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Micro-batches whose activations the first stage holds at its peak (in units of its own layers)."""
    if p <= 1:
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if schedule == "interleaved":
        return min(m, p) * (1 + (p - 1) / (p * v))
    if schedule == "zb-h2":
        return min(m, 2 * p - 1)
    return float(min(m, p))


def timeline(schedule: str, p: int, m: int, v: int = 1, t_f: float = 1.0, t_b: float = 2.0):
    """(stage, start, duration, kind, micro-batch) blocks of a 1F1B-family schedule, for the plot.

    A simple greedy simulation: each stage runs warm-up forwards, then alternates one forward and one
    backward, respecting the dependencies between neighbouring stages. Interleaving is drawn as 1F1B
    with v-times shorter, v-times more numerous blocks.
    """
    if schedule == "interleaved" and v > 1:
        t_f, t_b, m = t_f / v, t_b / v, m * v
    gpipe = schedule == "gpipe"
    fwd_done = [[0.0] * m for _ in range(p)]
    bwd_done = [[0.0] * m for _ in range(p)]
    free = [0.0] * p
    blocks = []
    order = []
    for s in range(p):
        warm = m if gpipe else min(m, p - s)
        ops = [("F", i) for i in range(warm)]
        f_next, b_next = warm, 0
        while b_next < m:
            ops.append(("B", b_next))
            b_next += 1
            if f_next < m:
                ops.append(("F", f_next))
                f_next += 1
        order.append(ops)
    # Forward dependencies flow down the stages, backward dependencies flow up: iterate to a fixed point.
    for _ in range(2 * p + 2):
        free = [0.0] * p
        blocks = []
        for s in range(p):
            for kind, i in order[s]:
                if kind == "F":
                    ready = fwd_done[s - 1][i] if s > 0 else 0.0
                    start = max(free[s], ready)
                    fwd_done[s][i] = start + t_f
                    free[s] = start + t_f
                    blocks.append((s, start, t_f, "F", i))
                else:
                    ready = bwd_done[s + 1][i] if s < p - 1 else fwd_done[s][i]
                    start = max(free[s], ready)
                    bwd_done[s][i] = start + t_b
                    free[s] = start + t_b
                    blocks.append((s, start, t_b, "B", i))
    return blocks
