"""A whole run: time to train N tokens, GPU-hours, cost, energy, CO2e, checkpoints and reliability.

* Energy: every accelerator draws up to its TDP; the node around it (CPUs, NICs, switches, fans) adds
  HOST_POWER_FACTOR (a DGX H100 is rated 10.2 kW for 8 x 700 W of GPUs: 1.8x; DGX A100 6.5 kW for
  8 x 400 W: 2.0x; we use 1.6 for a GPU busy at training power, below TDP). Facility energy = IT energy x PUE;
  CO2e = facility energy x grid carbon intensity.
* Checkpoint: weights (bf16) + fp32 master weights and Adam moments = 2 + 12 bytes per parameter,
  written at the file system's write bandwidth.
* Reliability: with a per-device MTBF M_d, the job fails every M = M_d / n hours. Young (1974) gives the
  checkpoint interval minimizing lost time, tau = sqrt(2·delta·M) for a checkpoint cost delta; Daly (2006)
  refines it to tau = sqrt(2·delta·M)·(1 + sqrt(delta/(2M))/3 + delta/(18M)) - delta (delta < 2M).
  Goodput = useful time / wall time ~ 1 - delta/tau - (tau/2 + R)/M, R the restart time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from scalelm.model.config import ModelConfig
from scalelm.model.counting import num_params
from scalelm.perf import comm
from scalelm.perf.hardware import Hardware
from scalelm.perf.step import StepResult

HOST_POWER_FACTOR = 1.6
RESTART_S = 600.0
"""Time to detect a failure, reschedule and reload the last checkpoint (order of 10 minutes)."""
CHECKPOINT_BYTES_PER_PARAM = 14.0


@dataclass
class RunEstimate:
    tokens: float
    steps: int
    wall_hours: float
    """Including checkpoint writes and expected failures (goodput)."""
    gpu_hours: float
    cost_usd: float
    energy_mwh: float
    co2e_tonnes: float
    checkpoint_gib: float
    checkpoint_write_s: float
    job_mtbf_hours: float
    expected_interruptions: float
    checkpoint_interval_min: float
    goodput: float
    parameter_server_s: float
    all_reduce_s: float

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def young_daly_interval_s(checkpoint_s: float, mtbf_s: float) -> float:
    """Daly 2006 eq. 37 (higher-order Young); falls back to the MTBF when delta >= 2M."""
    d, m = checkpoint_s, mtbf_s
    if d <= 0:
        return float("inf")
    if d >= 2 * m:
        return m
    return math.sqrt(2 * d * m) * (1 + math.sqrt(d / (2 * m)) / 3 + d / (18 * m)) - d


def goodput(checkpoint_s: float, interval_s: float, mtbf_s: float, restart_s: float = RESTART_S) -> float:
    """Share of wall time that advances training (first-order: checkpoint overhead + expected rework)."""
    if interval_s == float("inf"):
        return 1.0
    return max(0.0, 1 - checkpoint_s / (interval_s + checkpoint_s) - (interval_s / 2 + restart_s) / mtbf_s)


def estimate_run(cfg: ModelConfig, hw: Hardware, res: StepResult, seq_len: int, global_batch: int,
                 tokens: float) -> RunEstimate:
    n = res.layout.world if res.layout else 1
    tokens_per_step = global_batch * seq_len
    steps = math.ceil(tokens / tokens_per_step)
    compute_s = steps * res.step_time_s
    psi = num_params(cfg)
    ckpt_bytes = psi * CHECKPOINT_BYTES_PER_PARAM
    ckpt_s = ckpt_bytes / (hw.storage.write_gb_s * 1e9)
    mtbf_s = hw.mtbf_hours * 3600 / n
    interval = young_daly_interval_s(ckpt_s, mtbf_s)
    gp = goodput(ckpt_s, interval, mtbf_s)
    wall_s = compute_s / max(gp, 1e-6)
    gpu_hours = wall_s * n / 3600
    it_kwh = gpu_hours * hw.accelerator.tdp_w * HOST_POWER_FACTOR / 1000
    facility_kwh = it_kwh * hw.datacenter.pue
    # Parameter server vs all-reduce for this step's gradients (seed 002): one server per node.
    lo = res.layout
    grad_bytes = psi / max(1, (lo.tp * lo.pp) if lo else 1) * 2
    dp = lo.dp if lo else 1
    ps = comm.parameter_server_s(grad_bytes, dp, max(1, n // hw.node.gpus_per_node), hw)
    ar = comm.all_reduce_s(grad_bytes, dp, hw, max(1, hw.node.domain // (lo.tp if lo else 1)))
    return RunEstimate(
        tokens=tokens, steps=steps, wall_hours=wall_s / 3600, gpu_hours=gpu_hours,
        cost_usd=gpu_hours * hw.accelerator.price_per_hour_usd, energy_mwh=facility_kwh / 1000,
        co2e_tonnes=facility_kwh * hw.datacenter.carbon_kg_per_kwh / 1000,
        checkpoint_gib=ckpt_bytes / 2**30, checkpoint_write_s=ckpt_s, job_mtbf_hours=mtbf_s / 3600,
        expected_interruptions=wall_s / mtbf_s, checkpoint_interval_min=interval / 60, goodput=gp,
        parameter_server_s=ps, all_reduce_s=ar)
