"""Plain-text tables for `scalelm plan`, `scalelm plan evaluate` and `scalelm hw` (no dependencies)."""

from __future__ import annotations

from scalelm.perf.evaluate import THROUGHPUT, RowResult
from scalelm.perf.hardware import Hardware
from scalelm.perf.run import RunEstimate
from scalelm.perf.step import StepResult


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def fmt(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align))

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


PLAN_COLUMNS = ["#", "layout", "zero", "mb", "recompute", "sp", "schedule", "step_s", "tok/s/dev", "MFU",
                "mem_GiB", "states", "act", "bottleneck"]


def plan_rows(results: list[StepResult]) -> list[list]:
    rows = []
    for i, r in enumerate(results, 1):
        lo, mem = r.layout, r.memory_gib()
        states = mem["params"] + mem["grads"] + mem["optimizer"]
        sched = lo.schedule if lo.pp > 1 else "-"
        if lo.pp > 1 and lo.vpp > 1:
            sched = f"{lo.schedule}(v{lo.vpp})"
        rows.append([i, lo.short(), lo.zero, lo.micro_batch, lo.recompute, "y" if lo.sequence_parallel else "n",
                     sched, f"{r.step_time_s:.3f}", f"{r.tokens_per_s_per_device:,.0f}", f"{r.mfu:.3f}",
                     f"{r.peak_mem_gib:.1f}", f"{states:.1f}", f"{mem['activations'] + mem['logits']:.1f}",
                     r.bottleneck])
    return rows


def breakdown(r: StepResult) -> str:
    t = r.time_s
    lines = ["time per step (exposed seconds; hidden communication in brackets):"]
    for k, v in t.items():
        if v <= 0 and r.hidden_s.get(k, 0) <= 0:
            continue
        hid = r.hidden_s.get(k, 0.0)
        share = 100 * v / r.step_time_s
        lines.append(f"  {k:<10} {v:10.4f} s  {share:5.1f}%" + (f"  [{hid:.4f} s hidden]" if hid > 0 else ""))
    mem = r.memory_gib()
    lines.append(f"memory per device (GiB, peak on the {r.memory.peak_stage} pipeline stage):")
    lines.append("  " + "  ".join(f"{k} {v}" for k, v in mem.items()))
    return "\n".join(lines)


def _num(x: float) -> str:
    """Three significant figures, thousands separated: 0.0123, 4.56, 789, 12,345."""
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def human_duration(seconds: float) -> str:
    """Seconds in the unit that reads best: s, min, hours or days."""
    for unit, size in (("days", 86400.0), ("hours", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{_num(seconds / size)} {unit}"
    return f"{_num(seconds)} s"


def _scaled(value: float, units: tuple[str, str, str], step: float) -> str:
    """`value` given in the middle unit, shown in the small, middle or large one (a factor `step` apart)."""
    small, middle, large = units
    if value >= step:
        return f"{_num(value / step)} {large}"
    if value >= 1:
        return f"{_num(value)} {middle}"
    return f"{_num(value * step)} {small}"


def human_energy(kwh: float) -> str:
    """kWh below 1 MWh, MWh above (Wh below 1 kWh)."""
    return _scaled(kwh, ("Wh", "kWh", "MWh"), 1000.0)


def human_mass(kg: float) -> str:
    """CO2e in g, kg or t."""
    return _scaled(kg, ("g", "kg", "t"), 1000.0)


def human_bytes(gib: float) -> str:
    return _scaled(gib, ("MiB", "GiB", "TiB"), 1024.0)


def human_usd(usd: float) -> str:
    return f"${usd:,.0f}" if usd >= 100 else f"${usd:.2f}"


def run_summary(run: RunEstimate, hw: Hardware) -> str:
    kwh = run.energy_mwh * 1000
    return "\n".join([
        (f"run: {run.tokens:.3g} tokens in {run.steps:,} steps, {human_duration(run.wall_hours * 3600)} wall "
        f"({_num(run.gpu_hours)} GPU-hours, {human_usd(run.cost_usd)} at ${hw.accelerator.price_per_hour_usd}/GPU-h)"),
        (f"energy: {human_energy(kwh)} with PUE {hw.datacenter.pue} -> {human_mass(run.co2e_tonnes * 1000)} CO2e "
        f"at {hw.datacenter.carbon_kg_per_kwh} kg/kWh"),
        (f"checkpoint: {human_bytes(run.checkpoint_gib)}, {human_duration(run.checkpoint_write_s)} to write at "
        f"{hw.storage.write_gb_s} GB/s; job MTBF {human_duration(run.job_mtbf_hours * 3600)} -> "
        f"{run.expected_interruptions:.2g} interruptions, checkpoint every "
        f"{human_duration(run.checkpoint_interval_min * 60)} (Young/Daly), goodput {run.goodput:.3f}"),
        (f"gradient sync per step: all-reduce {run.all_reduce_s:.3g} s vs parameter server "
        f"{run.parameter_server_s:.3g} s (one server per node)"),
    ])


def evaluate_table(kind: str, results: list[RowResult]) -> str:
    unit = "tok/s/GPU" if kind == THROUGHPUT else "peak GiB"
    rows = []
    for r in results:
        extra = r.extra or {}
        mem = ""
        if "predicted_peak_mem_gib" in extra and extra.get("memory_capacity_gib"):
            share = extra["predicted_peak_mem_gib"] / extra["memory_capacity_gib"]
            mem = f"{100 * share:.0f}%" + (" over" if share > 1 else "")
        band = f"{r.interval[0]:,.0f}-{r.interval[1]:,.0f}" if r.interval else ""
        if r.error_pct is None:
            rows.append([r.id, "-", r.measured if r.measured is not None else "-", "-", "",
                         f"cannot predict: {r.reason}", ""])
        else:
            rows.append([r.id, f"{r.predicted:,.1f}", f"{r.measured:,.1f}", f"{r.error_pct:+.1f}", band,
                         r.bottleneck or "", mem])
    headers = ["id", f"predicted {unit}", f"measured {unit}", "error%", "80% interval", "bottleneck", "mem/capacity"]
    if kind != THROUGHPUT:
        headers, rows = headers[:4] + headers[5:-1], [row[:4] + row[5:-1] for row in rows]
        return table(headers, rows, "lrrrl")
    return table(headers, rows, "lrrrrlr")


def summary_line(kind: str, summary: dict) -> str:
    what = "tokens/s per device" if kind == THROUGHPUT else "peak memory per device"
    if not summary.get("predicted"):
        return f"summary: no row could be predicted ({summary.get('rows', 0)} rows)"
    return (f"summary ({what}): {summary['predicted']}/{summary['rows']} rows predicted; "
            f"median |error| {summary['median_abs_error_pct']:.2f}%, mean |error| {summary['mean_abs_error_pct']:.2f}%, "
            f"within 10%: {100 * summary['within_10pct']:.1f}%, within 20%: {100 * summary['within_20pct']:.1f}%, "
            f"mean signed error {summary['mean_error_pct']:+.2f}%"
            + (f"; measured inside the 80% interval: {100 * summary['interval_coverage_80']:.1f}% of "
               f"{summary['intervals']}" if "interval_coverage_80" in summary else ""))


def hardware_list(entries: list[tuple[str, Hardware]]) -> str:
    rows = []
    for name, hw in entries:
        a = hw.accelerator
        peak = a.peak_tflops.get("bf16") or a.peak_tflops.get("fp16") or 0
        rows.append([name, a.name[:44], f"{peak:g}", f"{a.peak_tflops.get('fp8', 0) or '-'}", f"{a.hbm_gib:g}",
                     f"{a.hbm_tb_s:g}", f"{a.tdp_w:g}", f"{hw.node.gpus_per_node}x{hw.node.intra_node_gb_s:g}",
                     hw.network.key, f"{a.price_per_hour_usd:g}"])
    return table(["name", "accelerator", "bf16_TF", "fp8_TF", "HBM_GiB", "HBM_TB/s", "TDP_W", "node(GPUxGB/s)",
                  "inter_node", "$/h"], rows, "llrrrrrrlr")


def hardware_show(hw: Hardware) -> str:
    a, e, n, net = hw.accelerator, hw.efficiency, hw.node, hw.network
    lines = [f"{a.key}: {a.name}" + (f"  (cluster: {hw.name}, {hw.nodes} nodes)" if hw.nodes else ""),
             "  peak TFLOP/s: " + ", ".join(f"{k} {v:g}" for k, v in a.peak_tflops.items()),
             f"  HBM {a.hbm_gib:g} GiB at {a.hbm_tb_s:g} TB/s; TDP {a.tdp_w:g} W; ${a.price_per_hour_usd}/h",
             (f"  efficiencies: matmul {e.matmul}"
             + (f" (fp32 fast path {e.matmul_fp32_fast})" if e.matmul_fp32_fast is not None else "")
             + (f" (bf16 {e.matmul_bf16})" if e.matmul_bf16 is not None else "")
             + f", attention {e.attention}, memory bw {e.memory_bw}, "
             f"clock derate {e.clock_derate}, kernel overhead {e.kernel_overhead_us} us"
             + (f", host {e.host_op_us} us/op" if e.host_op_us else "")),
             (f"  node: {n.gpus_per_node} per node (NVLink domain {n.nvlink_domain}), {n.intra_node_gb_s:g} GB/s/dir "
             f"{n.intra_node_fabric}"),
             (f"  inter-node: {net.key}: {net.name}; {net.ports_per_node} x {net.per_port_gbps:g} Gb/s = "
             f"{net.node_total_gbps:g} Gb/s, efficiency {net.efficiency}, latency {net.latency_us} us"),
             (f"  storage: write {hw.storage.write_gb_s:g} GB/s, read {hw.storage.read_gb_s:g} GB/s; datacenter: PUE "
             f"{hw.datacenter.pue}, {hw.datacenter.carbon_kg_per_kwh} kg CO2e/kWh; MTBF/device {hw.mtbf_hours:,.0f} h"),
             f"  source: {a.source}", f"  efficiency source: {e.source}"]
    return "\n".join(lines)
