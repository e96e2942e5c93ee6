"""The planner: enumerate every valid layout, keep those that fit, rank them.

Search space (all of it, no sampling): tp over divisors of n_head up to the NVLink domain; pp over
1..n_layer that divide the device count; dp the remaining factor (cp > 1 only for sequences of 16k+);
ZeRO 0-3; micro-batch over divisors of the per-replica batch; recompute none/selective/full; sequence
parallel on/off when tp > 1; schedule 1F1B, interleaved (v in 2, 4 dividing the stage), zero-bubble
ZB-H1, GPipe. Memory is checked before time, and per-layer kernel times are cached across layouts that
only differ in pp/dp/ZeRO, which keeps gpt3-175b on 1024 GPUs well under two seconds.

Heterogeneous clusters: hetero.plan_heterogeneous.
"""

from __future__ import annotations

from dataclasses import dataclass

from scalelm.model.config import ModelConfig
from scalelm.perf.frameworks import PROFILES, Framework
from scalelm.perf.hardware import Hardware
from scalelm.perf.layout import Layout
from scalelm.perf.step import GIB, StepResult, predict_memory, predict_step

RANK_BY = ("throughput", "cost", "energy", "memory")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Plan:
    results: list[StepResult]
    considered: int
    fitting: int


def candidate_layouts(cfg: ModelConfig, hw: Hardware, n_devices: int, seq_len: int, global_batch: int,
                      precision: str = "bf16", fixed: dict | None = None):
    """Yield every structurally valid Layout (divisibility only; memory is checked by the caller)."""
    fixed = fixed or {}
    domain = max(hw.node.gpus_per_node, hw.node.nvlink_domain)
    tps = [t for t in _divisors(n_devices) if t <= domain and cfg.n_head % t == 0
           and (cfg.kv_heads % t == 0 or t % cfg.kv_heads == 0)]
    cps = [c for c in (1, 2, 4, 8) if seq_len >= 16384 and seq_len % c == 0] or [1]
    for tp in [fixed["tp"]] if "tp" in fixed else tps:
        for cp in [fixed["cp"]] if "cp" in fixed else cps:
            rest = n_devices // (tp * cp)
            if tp * cp * rest != n_devices:
                continue
            for pp in [fixed["pp"]] if "pp" in fixed else [p for p in _divisors(rest) if p <= cfg.n_layer]:
                dp = rest // pp
                if dp * pp != rest or global_batch % dp:
                    continue
                per_replica = global_batch // dp
                mbs = [b for b in _divisors(per_replica) if b <= 64]
                for mb in [fixed["micro_batch"]] if "micro_batch" in fixed else mbs:
                    if per_replica % mb:
                        continue
                    scheds = [("1f1b", 1)]
                    if pp > 1:
                        scheds += [("interleaved", v) for v in (2, 4) if cfg.n_layer % (pp * v) == 0]
                        scheds += [("zb-h1", 1), ("gpipe", 1)]
                    zeros = [0, 1, 2, 3] if dp * cp > 1 else [0]
                    optimizer = fixed.get("optimizer", "adamw")
                    if optimizer == "muon":  # whole matrices on every rank
                        if tp > 1:
                            continue
                        zeros = [z for z in zeros if z <= 1 or dp * cp == 1]
                    for zero in [fixed["zero"]] if "zero" in fixed else zeros:
                        for rc in [fixed["recompute"]] if "recompute" in fixed else ("none", "selective", "full"):
                            sps = [False, True] if tp > 1 else [False]
                            for sp in [fixed["sequence_parallel"]] if "sequence_parallel" in fixed else sps:
                                for sched, v in scheds:
                                    if "schedule" in fixed and sched != fixed["schedule"]:
                                        continue
                                    yield Layout(tp=tp, pp=pp, dp=dp, cp=cp, zero=zero, micro_batch=mb, vpp=v,
                                                 schedule=sched, sequence_parallel=sp, recompute=rc,
                                                 precision=precision, optimizer=optimizer)


def _score(res: StepResult, hw: Hardware, rank_by: str) -> float:
    if rank_by == "memory":
        return res.peak_mem_gib
    if rank_by == "cost":  # dollars per token: price x devices x time / tokens (devices cancel per device)
        return hw.accelerator.price_per_hour_usd / res.tokens_per_s_per_device
    if rank_by == "energy":
        return hw.accelerator.tdp_w / res.tokens_per_s_per_device
    return -res.tokens_per_s_per_device


def search(cfg: ModelConfig, hw: Hardware, n_devices: int, seq_len: int, global_batch: int,
           precision: str = "bf16", framework: Framework | None = None, top_k: int = 5,
           rank_by: str = "throughput", fixed: dict | None = None, mem_headroom: float = 0.95) -> Plan:
    """All valid layouts that fit in `mem_headroom` of HBM, best first by `rank_by`."""
    fw = framework or PROFILES["scalelm"]
    hbm = hw.accelerator.hbm_gib * GIB * mem_headroom
    cache: dict = {}
    considered = 0
    fitting: list[StepResult] = []
    # Memory does not depend on the schedule except through in-flight micro-batches: check it first.
    for lo in candidate_layouts(cfg, hw, n_devices, seq_len, global_batch, precision, fixed):
        considered += 1
        m = global_batch // (lo.dp * lo.micro_batch)
        if predict_memory(cfg, hw, lo, fw, seq_len, m, cache=cache).total > hbm:
            continue
        res = predict_step(cfg, hw, lo, seq_len, global_batch, fw, strict=False, cache=cache)
        fitting.append(res)
    fitting.sort(key=lambda r: (_score(r, hw, rank_by), r.peak_mem_gib))
    # Keep distinct layouts in the top-k: of layouts equally fast (a knob with no effect on time, such as
    # selective recompute under flash attention), show the one that needs the least memory.
    seen, top = set(), []
    for r in fitting:
        key = (round(r.step_time_s, 3), r.layout.tp, r.layout.pp, r.layout.dp, r.layout.micro_batch)
        if key in seen:
            continue
        seen.add(key)
        top.append(r)
        if len(top) >= top_k:
            break
    return Plan(top, considered, len(fitting))


def best_layout(cfg: ModelConfig, hw: Hardware, n_devices: int, seq_len: int, global_batch: int,
                precision: str = "bf16", framework: Framework | None = None) -> StepResult | None:
    """The fastest layout that fits, or None; what `scalelm train --parallel auto` asks for."""
    plan = search(cfg, hw, n_devices, seq_len, global_batch, precision, framework, top_k=1)
    return plan.results[0] if plan.results else None
