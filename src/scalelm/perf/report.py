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


def run_summary(run: RunEstimate, hw: Hardware) -> str:
    return "\n".join([
        (f"run: {run.tokens:.3g} tokens in {run.steps:,} steps, {run.wall_hours / 24:,.1f} days wall "
        f"({run.gpu_hours:,.0f} GPU-hours, ${run.cost_usd:,.0f} at ${hw.accelerator.price_per_hour_usd}/GPU-h)"),
        (f"energy: {run.energy_mwh:,.1f} MWh with PUE {hw.datacenter.pue} -> {run.co2e_tonnes:,.1f} t CO2e "
        f"at {hw.datacenter.carbon_kg_per_kwh} kg/kWh"),
        (f"checkpoint: {run.checkpoint_gib:,.0f} GiB, {run.checkpoint_write_s:,.0f} s to write at "
        f"{hw.storage.write_gb_s} GB/s; job MTBF {run.job_mtbf_hours:.1f} h -> "
        f"{run.expected_interruptions:.0f} interruptions, checkpoint every {run.checkpoint_interval_min:.0f} min "
        f"(Young/Daly), goodput {run.goodput:.3f}"),
        (f"gradient sync per step: all-reduce {run.all_reduce_s:.3f} s vs parameter server "
        f"{run.parameter_server_s:.3f} s (one server per node)"),
    ])


def evaluate_table(kind: str, results: list[RowResult]) -> str:
    unit = "tok/s/GPU" if kind == THROUGHPUT else "peak GiB"
    rows = []
    for r in results:
        if r.error_pct is None:
            rows.append([r.id, "-", r.measured if r.measured is not None else "-", "-", f"cannot predict: {r.reason}"])
        else:
            rows.append([r.id, f"{r.predicted:,.1f}", f"{r.measured:,.1f}", f"{r.error_pct:+.1f}", r.bottleneck or ""])
    return table(["id", f"predicted {unit}", f"measured {unit}", "error%", "bottleneck"], rows, "lrrrl")


def summary_line(kind: str, summary: dict) -> str:
    what = "tokens/s per device" if kind == THROUGHPUT else "peak memory per device"
    if not summary.get("predicted"):
        return f"summary: no row could be predicted ({summary.get('rows', 0)} rows)"
    return (f"summary ({what}): {summary['predicted']}/{summary['rows']} rows predicted; "
            f"median |error| {summary['median_abs_error_pct']:.2f}%, mean |error| {summary['mean_abs_error_pct']:.2f}%, "
            f"within 10%: {100 * summary['within_10pct']:.1f}%, within 20%: {100 * summary['within_20pct']:.1f}%, "
            f"mean signed error {summary['mean_error_pct']:+.2f}%")


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
             (f"  efficiencies: matmul {e.matmul}, attention {e.attention}, memory bw {e.memory_bw}, "
             f"clock derate {e.clock_derate}, kernel overhead {e.kernel_overhead_us} us"),
             (f"  node: {n.gpus_per_node} per node (NVLink domain {n.nvlink_domain}), {n.intra_node_gb_s:g} GB/s/dir "
             f"{n.intra_node_fabric}"),
             (f"  inter-node: {net.key}: {net.name}; {net.ports_per_node} x {net.per_port_gbps:g} Gb/s = "
             f"{net.node_total_gbps:g} Gb/s, efficiency {net.efficiency}, latency {net.latency_us} us"),
             (f"  storage: write {hw.storage.write_gb_s:g} GB/s, read {hw.storage.read_gb_s:g} GB/s; datacenter: PUE "
             f"{hw.datacenter.pue}, {hw.datacenter.carbon_kg_per_kwh} kg CO2e/kWh; MTBF/device {hw.mtbf_hours:,.0f} h"),
             f"  source: {a.source}", f"  efficiency source: {e.source}"]
    return "\n".join(lines)
