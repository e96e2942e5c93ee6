"""`plan evaluate` against the published runs (acceptance 1) and its row handling."""

import csv
from pathlib import Path

import pytest

from scalelm.perf.evaluate import (
    MEMORY,
    THROUGHPUT,
    evaluate_file,
    evaluate_row,
    memory_note,
    row_framework,
    row_hardware,
    row_layout,
    row_model,
    to_json,
)
from scalelm.perf.hardware import load_hardware, load_network
from scalelm.perf.step import predict_memory

DATA = Path(__file__).with_name("data")


@pytest.fixture(scope="module")
def runs():
    return evaluate_file(DATA / "dev_runs.csv")


def test_dev_runs_accuracy(runs):
    kind, _results, summary = runs
    assert kind == THROUGHPUT and summary["predicted"] == summary["rows"] == 169
    assert summary["median_abs_error_pct"] <= 7.0
    assert summary["within_10pct"] >= 0.75


def test_dev_memory_accuracy():
    kind, _results, summary = evaluate_file(DATA / "dev_memory.csv")
    assert kind == MEMORY and summary["predicted"] == 20
    assert summary["median_abs_error_pct"] <= 10.0


def test_json_shape(runs):
    out = to_json(*runs)
    row = out["rows"][0]
    for key in ("id", "predicted_tokens_per_s_per_gpu", "measured_tokens_per_s_per_gpu", "error_pct", "bottleneck"):
        assert key in row
    r = runs[1][0]
    assert row["error_pct"] == pytest.approx(100 * (r.predicted - r.measured) / r.measured, abs=0.01)
    assert set(out["summary"]) >= {"median_abs_error_pct", "mean_abs_error_pct", "within_10pct"}


def test_every_hardware_key_of_the_schema_is_recognized():
    """Each `gpu` key of the schema loads as that accelerator, with a default inter-node fabric that is itself a
    known `inter_node` key (what an empty inter_node column becomes); each `inter_node` key loads."""
    for gpu in ("v100-32gb", "a100-40gb", "a100-80gb", "a100-unspecified", "h100-sxm-80gb", "h100-96gb-500w",
                "h200-141gb", "gb200", "b200", "mi300x", "tpu-v3", "tpu-v4"):
        hw = load_hardware(gpu)
        assert hw.key == gpu
        assert load_network(hw.network.key) == hw.network  # each device names its usual fabric, a known one
    for net in ("ib-hdr-4x200", "ib-hdr-8x200", "ib-ndr-8x400", "opa-4x100", "rdma-8x400", "roce-1600", "roce-3200"):
        assert load_network(net).node_total_gbps > 0


def _first_row():
    with open(DATA / "dev_runs.csv", newline="") as f:
        return next(csv.DictReader(f))


def test_row_that_cannot_be_predicted_gets_a_reason():
    row = dict(_first_row(), gpu="a100-81gb")
    res = evaluate_row(row, THROUGHPUT)
    assert res.error_pct is None and "a100-81gb" in res.reason


def _documented_default(row: dict, column: str) -> str:
    """What an empty optional column means, written out: the framework profile's default (frameworks.py;
    sequence parallelism "tp>1" is on exactly when tp > 1), and for inter_node the GPU's usual fabric."""
    if column == "inter_node":
        return load_hardware(row["gpu"]).network.key
    default = row_framework(row).defaults[column]
    if column == "sequence_parallel":
        assert default == "tp>1"
        return "1" if int(row["tp"]) > 1 else "0"
    return str(default)


@pytest.mark.parametrize(("run", "column"), [
    ("NARAYANAN21-T1-6", "micro_batch"), ("NARAYANAN21-T1-6", "vpp"), ("NARAYANAN21-T1-6", "sequence_parallel"),
    ("LLMFOUNDRY-a100_80gb-70b-s2048-g64", "inter_node")])
def test_empty_optional_columns_take_framework_defaults(run, column):
    """An empty column predicts exactly what the row with the documented default written in predicts. The run
    states another value, whose prediction differs: the default is what the empty column became."""
    stated = _row(run)
    default = _documented_default(stated, column)
    assert stated[column] != default
    empty, explicit, as_stated = (evaluate_row(dict(stated, **{column: v}), THROUGHPUT)
                                  for v in ("", default, stated[column]))
    assert empty.reason is None and empty.error_pct is not None
    assert (empty.predicted, empty.error_pct, empty.extra) == (explicit.predicted, explicit.error_pct, explicit.extra)
    assert empty.predicted != pytest.approx(as_stated.predicted, rel=1e-6)


def test_all_empty_optional_columns_give_the_default_layout():
    row = dict(_row("NARAYANAN21-T1-6"), micro_batch="", vpp="", sequence_parallel="", inter_node="")
    lo, gbs, seq = row_layout(row, row_framework(row), row_model(row))
    assert (lo.tp, lo.pp, lo.micro_batch, lo.vpp, lo.schedule, lo.sequence_parallel) == (8, 4, 1, 1, "1f1b", True)
    assert (gbs, seq) == (int(row["global_batch_seqs"]), 2048)


def test_unknown_schema_is_an_error(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="tokens_per_s_per_gpu"):
        evaluate_file(p)


def _row(prefix):
    with open(DATA / "dev_runs.csv", newline="") as f:
        return next(r for r in csv.DictReader(f) if r["id"].startswith(prefix))


def test_runs_that_ran_are_never_called_memory_capacity_bound(runs):
    """Every published run ran, so its bottleneck is named by time; a predicted peak over (or near) the device
    memory is reported separately, in `memory_note`."""
    _kind, results, _summary = runs
    assert all(r.bottleneck != "memory capacity" for r in results)
    small = [r for r in results if r.id.startswith("LLMFOUNDRY-a100_40gb-125m") or r.id.startswith(
        "LLMFOUNDRY-a100_40gb-350m")]
    assert small and all(r.extra["predicted_peak_mem_gib"] < r.extra["memory_capacity_gib"] for r in small)


def test_predicted_overshoot_is_a_note_not_the_bottleneck():
    row = dict(_row("LLMFOUNDRY-a100_80gb-30b-s8192"), gpu="a100-40gb")  # 30B on 8 x 40 GB cannot fit
    res = evaluate_row(row, THROUGHPUT)
    assert res.bottleneck in ("compute", "memory bandwidth", "DP communication")
    assert res.extra["memory_note"].startswith("over capacity")
    assert res.extra["predicted_peak_mem_gib"] > 40


def test_memory_note():
    assert memory_note(30.0, 40.0) is None
    assert memory_note(39.0, 40.0).startswith("near capacity")
    assert "+10.0%" in memory_note(44.0, 40.0)


def test_llm_foundry_loss_is_the_fused_bf16_kernel():
    """MPT's default loss_fn is flash-attn's fused xentropy: bf16 logits and a bf16 gradient, 4 bytes per logit."""
    row = _row("LLMFOUNDRY-a100_40gb-125m-s2048-g8")
    res = evaluate_row(row, THROUGHPUT)
    tokens = int(row["micro_batch"]) * int(row["seq_len"])
    logits_gib = tokens * int(row["vocab"]) * 4 / 2**30
    assert res.bottleneck == "compute"
    assert res.extra["predicted_peak_mem_gib"] < 40
    cfg = row_model(row)
    fw = row_framework(row)
    lo, _gbs, seq = row_layout(row, fw, cfg)
    mem = predict_memory(cfg, row_hardware(row), lo, fw, seq, 1)
    assert mem.logits / 2**30 == pytest.approx(logits_gib)
