"""Heterogeneous clusters: one pipeline across device groups, each group's stage sized to its speed.

A mixed-generation cluster (64 A100s and 32 H100s) trains one model as one pipeline whose consecutive stages live
on different groups: group g holds L_g consecutive layers and runs them on its n_g devices with its own best layout
(tp, pp, dp, ZeRO, micro-batch, recompute), the whole global batch passing through every group. The slowest group
sets the pace, so the layers are split to make every group's step time as equal as whole layers allow.

Each group's share is priced as a model of its L_g layers with the embedding and the output layer (which only the
first and last group hold; a middle group is overcharged by about one layer's time). Not modelled: the activation
transfers between groups and the pipeline bubble they add across groups.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from scalelm.model.config import ModelConfig
from scalelm.perf.frameworks import Framework
from scalelm.perf.hardware import Hardware
from scalelm.perf.planner import search
from scalelm.perf.step import StepResult

ROUNDS = 4
"""Rebalancing rounds: split by each group's planned step time as a line in its layers, re-plan, repeat."""


@dataclass
class GroupPlan:
    hardware: str
    devices: int
    layers: int
    result: StepResult | None
    """The group's best layout for its layers (None: no layout of them fits the group)."""

    def to_dict(self) -> dict:
        r = self.result
        return {"hardware": self.hardware, "devices": self.devices, "layers": self.layers,
                "layout": None if r is None else r.layout.to_dict(),
                "step_time_s": None if r is None else r.step_time_s,
                "peak_mem_gib": None if r is None else r.peak_mem_gib,
                "tokens_per_s_per_device": None if r is None else r.tokens_per_s_per_device}


def _balance(fixed_s: list[float], per_layer_s: list[float], n_layer: int) -> list[int]:
    """Whole layers per group minimizing the slowest group's time max_g(a_g + c_g·L_g), each group at least one layer:
    give each layer, one at a time, to the group it finishes soonest on (optimal for costs linear in L_g)."""
    layers = [1] * len(per_layer_s)
    for _ in range(n_layer - len(layers)):
        g = min(range(len(layers)), key=lambda g: fixed_s[g] + per_layer_s[g] * (layers[g] + 1))
        layers[g] += 1
    return layers


def plan_heterogeneous(cfg: ModelConfig, groups: list[tuple[Hardware, int]], seq_len: int, global_batch: int,
                       precision: str = "bf16", framework: Framework | None = None) -> list[GroupPlan]:
    """Layers and best layout per device group so that every group's step time is about the same."""
    if len(groups) > cfg.n_layer:
        raise ValueError(f"{len(groups)} device groups but only {cfg.n_layer} layers; use fewer groups")
    cache: dict[tuple[int, int], StepResult | None] = {}

    def best(g: int, layers: int) -> StepResult | None:
        if (g, layers) not in cache:
            hw, n = groups[g]
            plan = search(replace(cfg, n_layer=layers), hw, n, seq_len, global_batch, precision, framework, top_k=1)
            cache[g, layers] = plan.results[0] if plan.results else None
        return cache[g, layers]

    rates = [1.0 / (hw.accelerator.peak_flops(precision) * hw.efficiency.matmul * n) for hw, n in groups]
    layers = _balance([0.0] * len(groups), rates, cfg.n_layer)
    for _ in range(ROUNDS):
        results = [best(g, k) for g, k in enumerate(layers)]
        if any(r is None for r in results):
            return [GroupPlan(hw.key, n, k, r) for (hw, n), k, r in zip(groups, layers, results)]
        new = _balance([0.0] * len(groups), [r.step_time_s / k for r, k in zip(results, layers)], cfg.n_layer)
        if new == layers:
            break
        layers = new
    # Whole layers and layout jumps leave some imbalance: move single layers from the slowest group to the others
    # while that lowers the slowest group's time.
    for _ in range(2 * len(groups)):
        times = [best(g, k).step_time_s if best(g, k) else float("inf") for g, k in enumerate(layers)]
        slow = max(range(len(layers)), key=times.__getitem__)
        if layers[slow] == 1:
            break
        trials = []
        for g in range(len(layers)):
            if g != slow:
                moved = list(layers)
                moved[slow] -= 1
                moved[g] += 1
                trials.append(moved)
        scored = [(max(best(g, k).step_time_s if best(g, k) else float("inf") for g, k in enumerate(t)), t)
                  for t in trials]
        top, cand = min(scored)
        if top >= times[slow]:
            break
        layers = cand
    return [GroupPlan(hw.key, n, k, best(g, k)) for g, ((hw, n), k) in enumerate(zip(groups, layers))]
