"""The step model on every preset: parameter counts, memory, time, and the planner."""

import importlib.util

import pytest

from scalelm.model.counting import num_params
from scalelm.model.presets import PRESETS, get_preset
from scalelm.perf.hardware import catalog, load_hardware, networks
from scalelm.perf.hetero import plan_heterogeneous
from scalelm.perf.layout import Layout, LayoutError
from scalelm.perf.planner import best_layout, search
from scalelm.perf.step import predict_step, total_params


@pytest.mark.parametrize("name", list(PRESETS))
def test_params_equal_counting_for_every_preset(name):
    assert total_params(get_preset(name)) == num_params(get_preset(name))


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
@pytest.mark.parametrize("name", ["tiny", "shakespeare-char", "gpt2-124m"])
def test_params_equal_the_pytorch_model(name):
    from scalelm.model.gpt import GPT

    model = GPT(get_preset(name))
    n = sum(p.numel() for p in model.parameters())
    assert total_params(get_preset(name)) == n


def test_every_hardware_file_loads():
    for name in catalog():
        hw = load_hardware(name)
        assert hw.accelerator.peak_flops("bf16" if "v100" not in name else "fp16") > 0
    required = {"v100-32gb", "a100-40gb", "a100-80gb", "a100-unspecified", "h100-sxm-80gb", "h100-96gb-500w",
                "h200-141gb", "gb200", "b200", "mi300x", "tpu-v3", "tpu-v4", "dgx-superpod-h100"}
    assert required <= set(catalog())
    assert {"ib-hdr-4x200", "ib-hdr-8x200", "ib-ndr-8x400", "opa-4x100", "rdma-8x400", "roce-1600",
            "roce-3200"} <= set(networks())


@pytest.mark.parametrize("name", ["gpt2-124m", "gpt3-1.3b", "llama3-8b"])
def test_predict_step_is_consistent(name):
    cfg, hw = get_preset(name), load_hardware("h100-sxm-80gb")
    lo = Layout(tp=2, pp=2, dp=2, zero=1, micro_batch=2, sequence_parallel=True, recompute="selective")
    r = predict_step(cfg, hw, lo, 2048, 64)
    assert sum(r.time_s.values()) == pytest.approx(r.step_time_s)
    assert r.tokens_per_s_per_device == pytest.approx(64 * 2048 / r.step_time_s / 8)
    assert 0 < r.mfu < 1 and r.peak_mem_gib > 0 and r.bottleneck


def test_layout_knobs_move_memory_the_right_way():
    cfg, hw = get_preset("gpt3-13b"), load_hardware("a100-80gb")
    base = {"tp": 2, "pp": 1, "dp": 4, "micro_batch": 4}
    mem = {z: predict_step(cfg, hw, Layout(zero=z, **base), 2048, 64).peak_mem_gib for z in range(4)}
    assert mem[0] > mem[1] > mem[2] > mem[3]
    rc = {r: predict_step(cfg, hw, Layout(recompute=r, **base), 2048, 64) for r in ("none", "full")}
    assert rc["full"].peak_mem_gib < rc["none"].peak_mem_gib
    assert rc["full"].step_time_s > rc["none"].step_time_s


def test_impossible_layouts_say_what_to_change():
    cfg, hw = get_preset("gpt3-13b"), load_hardware("a100-80gb")
    with pytest.raises(LayoutError, match="n_head=40"):
        predict_step(cfg, hw, Layout(tp=3, dp=1), 2048, 8)
    with pytest.raises(LayoutError, match="devices|global batch"):
        predict_step(cfg, hw, Layout(dp=3, micro_batch=2), 2048, 8)


def test_planner_finds_fitting_layouts_and_respects_fixed_knobs():
    cfg, hw = get_preset("gpt3-6.7b"), load_hardware("a100-80gb")
    plan = search(cfg, hw, 16, 2048, 64, top_k=3)
    assert plan.results and plan.fitting <= plan.considered
    assert all(r.fits for r in plan.results)
    tps = [r.tokens_per_s_per_device for r in plan.results]
    assert tps == sorted(tps, reverse=True)
    fixed = search(cfg, hw, 16, 2048, 64, fixed={"tp": 2, "recompute": "full"}).results
    assert all(r.layout.tp == 2 and r.layout.recompute == "full" for r in fixed)
    assert best_layout(cfg, hw, 16, 2048, 64).layout.world == 16


def test_heterogeneous_split_gives_faster_devices_more_layers_and_equal_step_times():
    cfg = get_preset("gpt3-13b")
    split = plan_heterogeneous(cfg, [(load_hardware("a100-80gb"), 16), (load_hardware("h100-sxm-80gb"), 8)], 2048, 64)
    assert sum(s.layers for s in split) == cfg.n_layer
    assert split[1].layers / 8 > split[0].layers / 16  # per device, the faster group holds more
    times = [s.result.step_time_s for s in split]
    assert max(times) <= 1.10 * min(times)
    assert all(s.result.fits and s.result.layout.world == s.devices for s in split)


def test_perf_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys; import scalelm.perf.cli, scalelm.perf.planner, scalelm.perf.evaluate, scalelm.perf.plots; "
            "assert 'torch' not in sys.modules, 'perf imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fast_fp32_matmul_efficiency_applies_only_where_the_trainer_takes_that_path():
    from dataclasses import replace

    cfg, hw = get_preset("shakespeare-char"), load_hardware("h100-sxm-80gb")
    fast = replace(hw, efficiency=replace(hw.efficiency, matmul_fp32_fast=hw.efficiency.matmul * 1.25))

    def step(h, **kw):
        return predict_step(cfg, h, Layout(micro_batch=32, **kw), 256, 64).step_time_s

    assert step(fast, precision="fp32") < step(hw, precision="fp32")
    assert step(fast, precision="bf16") == step(hw, precision="bf16")
    assert step(fast, precision="fp32", tp=2) == step(hw, precision="fp32", tp=2)
