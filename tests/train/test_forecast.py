"""The trainer asks the perf model: the layout it predicts is the one that runs, `--parallel auto` picks layouts the
trainer can run, and every run logs predicted next to measured step time and memory."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import tomllib
from helpers import TINY, metrics, run_multiprocess, train

from scalelm.calibrate import write_toml
from scalelm.cli import main
from scalelm.config import ConfigError, build_config, validate_parallel
from scalelm.perf.hardware import load_hardware
from scalelm.train.checkpoint import checkpoint_dirs
from scalelm.train.forecast import apply_layout, choose_layout, match_accelerator, perf_layout, predict_run

SMALL = {"model.preset": "tiny", "train.global_batch": "8", "train.seq_len": "32"}
RUN = ["--train.steps", "4", "--train.log_every", "1", "--train.eval_batches", "1"]


def hardware_file(path: Path, ram_gib: float = 8.0) -> Path:
    """A hand-made `scalelm calibrate` result (the real calibration is never run in tests)."""
    result = {"matmul": {"peak_tflops": 0.1, "k_overhead": 32.0, "kernel_overhead_us": 5.0,
                         "shapes": [{"m": 8, "n": 8, "k": 8, "tflops": 0.1}]},
              "bf16_tflops": 0.05, "memory_tb_s": 0.01, "attention": 0.3,
              "collectives": {"latency_us": 40.0, "bandwidth_gb_s": 2.0}, "ram_gib": ram_gib, "threads": 1,
              "cpus": 2, "machine": "test", "torch": "x"}
    return write_toml(result, path)


@pytest.fixture
def hw_path(tmp_path):
    return hardware_file(tmp_path / "hw.toml")


def cfg(**overrides):
    return build_config({}, {**SMALL, **{k.replace("__", "."): v for k, v in overrides.items()}})


@pytest.mark.parametrize("overrides, world, expected", [
    ({}, 1, dict(tp=1, pp=1, dp=1, zero=0, micro_batch=8, recompute="none")),
    ({"parallel__zero": "3"}, 2, dict(dp=2, zero=3, dp_shard=None, micro_batch=4)),
    ({"parallel__dp_replicate": "2", "parallel__zero": "3", "train__micro_batch": "1"}, 4,
     dict(dp=4, dp_shard=2, zero=3, micro_batch=1)),
    ({"parallel__tp": "2", "parallel__sequence_parallel": "true"}, 2,
     dict(tp=2, dp=1, zero=0, sequence_parallel=True, micro_batch=8)),
    ({"parallel__pp": "2"}, 2, dict(pp=2, dp=1, schedule="1f1b", vpp=1, micro_batch=4)),
    ({"parallel__pp": "2", "parallel__pp_schedule": "interleaved-1f1b", "parallel__pp_microbatches": "4"}, 2,
     dict(pp=2, schedule="interleaved", vpp=2, micro_batch=2)),
    ({"parallel__pp": "2", "parallel__pp_schedule": "gpipe"}, 2, dict(pp=2, schedule="gpipe", vpp=1)),
    ({"parallel__pp": "2", "parallel__pp_schedule": "zbv"}, 2, dict(pp=2, schedule="zb-h1", vpp=2)),
    ({"parallel__activation_checkpoint": "full"}, 2, dict(dp=2, recompute="full")),
    ({"parallel__activation_checkpoint": "full"}, 1, dict(dp=1, recompute="full")),
])
def test_perf_layout_is_the_layout_the_trainer_runs(overrides, world, expected):
    lo = perf_layout(cfg(**overrides), world, "fp32")
    assert lo.precision == "fp32" and lo.cp == 1 and lo.world == world
    for key, value in expected.items():
        assert getattr(lo, key) == value, key


def test_selective_checkpointing_is_interpolated(hw_path):
    hw = load_hardware(str(hw_path))
    step = {mode: predict_run(cfg(parallel__activation_checkpoint=mode), 2, "fp32", hw)["step_time_s"]
            for mode in ("none", "selective", "full")}
    assert step["none"] < step["selective"] < step["full"]  # tiny: blocks 0 and 2 of 4 are checkpointed
    assert step["selective"] == pytest.approx((step["none"] + step["full"]) / 2)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("hardware", ["file", "h100-sxm-80gb"])
def test_choose_layout_gives_layouts_the_trainer_can_run(world, hardware, hw_path):
    hw = load_hardware(str(hw_path) if hardware == "file" else hardware)
    c = cfg()
    updates, result = choose_layout(c, world, "fp32", hw)
    apply_layout(c, updates, world)
    validate_parallel(c, world)
    p = c.parallel
    assert p.dp_replicate * p.dp_shard * p.tp * p.pp == world and p.dp_shard >= 1
    assert not (p.tp > 1 and p.zero < 2)
    assert p.activation_checkpoint in ("none", "full") and p.pp_schedule in ("gpipe", "1f1b", "interleaved-1f1b")
    assert (c.train.micro_batch == 0) == (p.pp > 1)
    assert result.fits and result.layout.cp == 1
    # the prediction of the applied config is the planner's own
    assert predict_run(c, world, "fp32", hw)["step_time_s"] == pytest.approx(result.step_time_s)


def test_choose_layout_says_why_nothing_fits(tmp_path):
    hw = load_hardware(str(hardware_file(tmp_path / "small.toml", ram_gib=0.1)))
    with pytest.raises(ConfigError, match="none of the .* layouts the trainer can run fits"):
        choose_layout(cfg(), 2, "fp32", hw)


def test_a_file_calibrated_with_other_threads_is_flagged(hw_path):
    """hardware_file() records 1 thread; a process with another thread count is told to calibrate again."""
    import torch

    from scalelm.train.forecast import resolve_hardware

    previous = torch.get_num_threads()
    try:
        for threads, flagged in ((1, False), (2, True)):
            torch.set_num_threads(threads)
            _, note = resolve_hardware(cfg(**{"parallel.hardware": str(hw_path)}), "cpu")
            assert ("calibrate again with OMP_NUM_THREADS=2" in note) == flagged, note
    finally:
        torch.set_num_threads(previous)


def test_gpu_names_match_the_catalog():
    assert match_accelerator("NVIDIA H100 80GB HBM3") == "h100-sxm-80gb"
    assert match_accelerator("NVIDIA A100-SXM4-40GB") == "a100-40gb"
    assert match_accelerator("NVIDIA GB200") == "gb200"
    assert match_accelerator("Quadro RTX 4000") is None


def test_run_logs_predicted_next_to_measured(tmp_path, hw_path):
    assert train(tmp_path / "r", *RUN, "--parallel.hardware", str(hw_path)) == 0
    records = metrics(tmp_path / "r")
    plan = records[0]
    assert plan["event"] == "plan" and plan["hardware"] == "local" and plan["auto"] is False
    assert plan["predicted_step_time_s"] > 0 and plan["predicted_peak_mem_gib"] > 0
    assert plan["layout"].startswith("tp1 pp1 dp1")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4
    for r in steps:
        assert r["predicted_step_time_s"] == plan["predicted_step_time_s"] and r["step_time_s"] > 0
        assert r["predicted_mem_gib"] == plan["predicted_peak_mem_gib"] and r["mem_gib"] > 0
    end = records[-1]
    measured = sum(r["step_time_s"] for r in steps[1:]) / 3  # after the first log interval
    assert end["event"] == "end" and end["measured_step_time_s"] == pytest.approx(measured)
    assert end["step_time_drift_pct"] == pytest.approx(100 * (plan["predicted_step_time_s"] - measured) / measured)


def test_resumed_run_keeps_one_plan_line_first(tmp_path, hw_path):
    args = [*RUN, "--checkpoint.every", "2", "--parallel.hardware", str(hw_path)]
    train(tmp_path / "r", *args)
    shutil.rmtree(checkpoint_dirs(tmp_path / "r")[-1])
    train(tmp_path / "r", *args)
    records = metrics(tmp_path / "r")
    assert records[0]["event"] == "plan" and sum(r.get("event") == "plan" for r in records) == 1
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert records[-1]["event"] == "end" and records[-1]["measured_step_time_s"] is not None  # steps 4 (after 3)


def test_auto_on_one_process(tmp_path, hw_path, capsys):
    assert train(tmp_path / "a", *RUN, "--parallel", "auto", "--parallel.hardware", str(hw_path)) == 0
    plan = metrics(tmp_path / "a")[0]
    assert plan["auto"] is True and plan["predicted_step_time_s"] > 0
    saved = tomllib.loads((tmp_path / "a" / "config.toml").read_text())
    assert saved["parallel"]["auto"] is True and saved["train"]["micro_batch"] in (1, 2, 4, 8)  # explicit, not 0
    assert "plan (hardware local from" in capsys.readouterr().err


def test_without_hardware_the_run_still_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    assert train(tmp_path / "n", *RUN) == 0
    records = metrics(tmp_path / "n")
    plan, end = records[0], records[-1]
    assert plan["event"] == "plan" and plan["predicted_step_time_s"] is None and "scalelm calibrate" in plan["note"]
    assert all(r["predicted_step_time_s"] is None for r in records if "loss" in r)
    assert end["predicted_step_time_s"] is None and end["step_time_drift_pct"] is None
    assert end["measured_step_time_s"] > 0
    assert "plan: no prediction" in capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["--parallel", "auto"], "parallel.auto needs a hardware model: run `scalelm calibrate`"),
    (["--parallel.hardware", "nope"], "parallel.hardware: unknown hardware 'nope'"),
    (["--parallel", "manual"], "--parallel takes only `auto`"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    assert main(["train", "--out", str(tmp_path / "e"), *TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err


@pytest.mark.multiproc
@pytest.mark.slow
def test_nproc_auto_plans_in_the_parent(tmp_path, hw_path):
    src = str(Path(__file__).parents[2] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, *sys.path]), OMP_NUM_THREADS="1")  # as tests/parallel
    out = tmp_path / "auto2"
    result = run_multiprocess([sys.executable, "-m", "scalelm", "train", "--nproc", "2", "--parallel", "auto",
                               "--parallel.hardware", str(hw_path), *TINY, "--train.steps", "2", "--train.log_every",
                               "1", "--train.eval_batches", "1", "--out", str(out)], env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("parallel auto (hardware local from")
    p = tomllib.loads((out / "config.toml").read_text())["parallel"]
    assert p["auto"] is True and p["dp_shard"] >= 1 and p["dp_replicate"] * p["dp_shard"] * p["tp"] * p["pp"] == 2
    plan = metrics(out)[0]
    assert plan["event"] == "plan" and plan["auto"] is True and plan["predicted_step_time_s"] > 0
