"""`scalelm calibrate`: the hardware file it writes loads as the step model reads it, and says how fast this
machine runs fp32 matmuls."""

from __future__ import annotations

import json
import time

import pytest
import tomllib

from scalelm.calibrate import write_toml
from scalelm.perf.hardware import load_hardware

# Every key write_toml reads, optional ones included.
FULL = {"matmul": {"peak_tflops": 0.125, "k_overhead": 32.5, "n_overhead": 60.25, "kernel_overhead_us": 5.5,
                   "shapes": [{"m": 8, "n": 8, "k": 8, "tflops": 0.1}]},
        "bf16_tflops": 0.0625, "bf16_k_overhead": 16.5, "bf16_n_overhead": 8.5, "memory_tb_s": 0.0125,
        "attention": 0.375, "attention_bf16": 1.25, "attention_tile_us": 12.5, "attention_tile_us_bf16": 25.5,
        "matmul_step_efficiency": 0.875, "matmul_fp32_fast": 1.125, "matmul_bf16": 0.75, "host_op_us": 2.5,
        "collectives": {"latency_us": 40.5, "bandwidth_gb_s": 2.5, "fsdp_unit_us": 100.5, "tp_comm_slowdown": 2.5},
        "ram_gib": 8.5, "probe_gflops": 55.5, "threads": 2, "cpus": 4, "machine": 'x86_64 "test" (4 CPUs)',
        "torch": "2.0"}
# The fewest keys: what an older or hand-made result has.
MINIMAL = {"matmul": {"peak_tflops": 0.1, "k_overhead": 32.0, "kernel_overhead_us": 5.0,
                      "shapes": [{"m": 8, "n": 8, "k": 8, "tflops": 0.1}]},
           "bf16_tflops": 0.05, "memory_tb_s": 0.01, "attention": 0.3,
           "collectives": {"latency_us": 40.0, "bandwidth_gb_s": 2.0}, "ram_gib": 8.0, "threads": 2, "cpus": 2,
           "machine": "test", "torch": "x"}


def test_written_file_loads_with_every_value(tmp_path):
    path = write_toml(FULL, tmp_path / "sub" / "local.toml")
    text = path.read_text()
    assert text.startswith("# Written by `scalelm calibrate`") and "# matmul shapes: 8x8x8: 100.0 GFLOP/s" in text
    hw = load_hardware(str(path))
    acc, eff, node = hw.accelerator, hw.efficiency, hw.node
    assert acc.key == "local" and acc.name == 'this machine: x86_64 "test" (4 CPUs), 2 threads'
    assert acc.peak_tflops == {"fp32": 0.125, "bf16": 0.0625}
    assert (acc.hbm_gib, acc.hbm_tb_s, acc.compute_units) == (8.5, 0.0125, 1)
    assert (eff.matmul, eff.matmul_fp32_fast, eff.matmul_bf16) == (0.875, 1.125, 0.75)
    assert (eff.matmul_k_overhead, eff.matmul_n_overhead) == (32.5, 60.2)  # one decimal
    assert (eff.matmul_k_overhead_bf16, eff.matmul_n_overhead_bf16) == (16.5, 8.5)
    assert (eff.memory_bw, eff.comm_overlap, eff.clock_derate) == (1.0, 0.0, 1.0)
    assert (eff.attention, eff.attention_bf16, eff.attention_tile_us, eff.attention_tile_us_bf16) == (
        0.375, 1.25, 12.5, 25.5)
    assert (eff.kernel_overhead_us, eff.host_op_us, eff.fsdp_unit_us, eff.tp_comm_slowdown) == (5.5, 2.5, 100.5, 2.5)
    assert (node.gpus_per_node, node.nvlink_domain, node.intra_node_gb_s, node.intra_node_latency_us) == (
        4, 4, 2.5, 40.5)
    assert (node.intra_node_efficiency, node.inter_node, hw.network.key) == (1.0, "ethernet-10g", "ethernet-10g")
    assert tomllib.loads(text)["calibration"] == {"threads": 2, "cpus": 4, "probe_gflops": 55.5, "torch": "2.0"}


def test_optional_values_fall_back_to_the_step_models_defaults(tmp_path):
    hw = load_hardware(str(write_toml(MINIMAL, tmp_path / "min.toml")))
    eff = hw.efficiency
    assert eff.matmul == 1.0 and eff.matmul_fp32_fast is None and eff.matmul_bf16 is None
    assert (eff.matmul_k_overhead, eff.matmul_n_overhead) == (32.0, 0.0)
    assert (eff.matmul_k_overhead_bf16, eff.matmul_n_overhead_bf16) == (32.0, 0.0)  # the fp32 curve's
    assert (eff.attention_bf16, eff.fsdp_unit_us, eff.tp_comm_slowdown) == (0.3, 0.0, 1.0)
    assert hw.node.gpus_per_node == 2


def test_plan_uses_the_calibrated_file(tmp_path, capsys, monkeypatch):
    """`--hardware local` reads the file calibrate writes to the cache directory, and its values drive the plan:
    the same file with twice the matmul peak predicts a faster step."""
    from scalelm.perf.cli import main_plan

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    write_toml(MINIMAL, tmp_path / "scalelm" / "hardware" / "local.toml")
    faster = dict(MINIMAL, matmul=dict(MINIMAL["matmul"], peak_tflops=0.2))
    fast_path = write_toml(faster, tmp_path / "fast.toml")
    argv = ["--model", "tiny", "--gpus", "2", "--seq", "64", "--global-batch", "8", "--precision", "fp32",
            "--tp", "1", "--pp", "1", "--json"]
    steps = {}
    for name in ("local", str(fast_path)):
        assert main_plan(["--hardware", name, *argv]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["hardware"] == "local" and out["devices"] == 2
        steps[name] = out["layouts"][0]["step_time_s"]
    assert 0 < steps[str(fast_path)] < steps["local"]


def test_calibrate_measures_this_machines_matmul_rate(tmp_path, monkeypatch, capsys):
    """`scalelm calibrate --quick --no-collectives --out F`, then the rate the file's fp32 GEMM curve gives a 512³
    matmul (a shape --quick measures) against fresh measurements of it taken just before and just after: within
    2× either way. Two fresh ones because a shared machine's speed moves between moments; the file must lie
    within 2× of that range. Kept to ~15 s by replacing what does not feed the fp32 rate and is slow on some CPUs:
    attention (builds the C++ kernel on a fresh cache) and the bf16 GEMMs (emulated without native bf16), both
    through calibrate's own fallbacks (RuntimeError: no bf16 curve, no bf16 factor)."""
    import torch

    import scalelm.calibrate.machine as machine
    from scalelm.cli import main
    from scalelm.perf.compute import curve_seconds
    from scalelm.train.peak import measure_cpu_matmul_flops

    real_matmul, real_factor = machine.measure_matmul, machine.measure_layer_matmul_factor

    def matmul_fp32_only(quick=False, dtype="float32"):
        if dtype != "float32":
            raise RuntimeError("bf16 left out in this test")
        return real_matmul(quick, dtype)

    def factor_fp32_only(peak, k0, n0, path, quick=False):
        if path == "bf16":
            raise RuntimeError("bf16 left out in this test")
        return real_factor(peak, k0, n0, path, quick)

    monkeypatch.setattr(machine, "measure_matmul", matmul_fp32_only)
    monkeypatch.setattr(machine, "measure_layer_matmul_factor", factor_fp32_only)
    monkeypatch.setattr(machine, "measure_attention", lambda peak, quick=False, dtype="float32": (0.5, 1.0))

    def fresh() -> float:  # median torch.mm 512³ FLOP/s over half a second, torch.utils.benchmark.Timer
        return measure_cpu_matmul_flops(torch.float32, seconds_per_size=0.5, sizes=(512,))

    start = time.perf_counter()
    out = tmp_path / "local.toml"
    before = fresh()
    assert main(["calibrate", "--quick", "--no-collectives", "--out", str(out)]) == 0
    after = fresh()
    elapsed = time.perf_counter() - start
    assert f"wrote {out}" in capsys.readouterr().out

    hw = load_hardware(str(out))
    peak = hw.accelerator.peak_flops("fp32")
    eff = hw.efficiency
    at_512 = 2 * 512**3 / curve_seconds(512, 512, 512, peak, eff.matmul_k_overhead, eff.matmul_n_overhead)
    report = (f"512³ GFLOP/s: fresh {before / 1e9:.1f} before, {after / 1e9:.1f} after; file's curve "
              f"{at_512 / 1e9:.1f} (peak {peak / 1e9:.1f}); {elapsed:.1f} s")
    assert min(before, after) / 2 < at_512 < 2 * max(before, after), report
    assert at_512 <= peak
    assert tomllib.loads(out.read_text())["calibration"]["threads"] == torch.get_num_threads()
    assert 0.3 <= eff.matmul <= 1.0 and hw.accelerator.hbm_tb_s > 0 and eff.host_op_us > 0
    assert eff.matmul_bf16 is None and hw.accelerator.peak_tflops["bf16"] == pytest.approx(peak / 1e12, rel=1e-5)
