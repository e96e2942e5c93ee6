"""CLI behaviour: output, JSON, and one-line errors with exit code 2."""

import json

import pytest

from scalelm.perf.cli import main_calibrate, main_hw, main_plan


def _run(fn, argv, capsys):
    rc = fn(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_plan_prints_a_table(capsys):
    rc, out, _err = _run(main_plan, ["--model", "gpt3-1.3b", "--gpu", "a100-80gb", "--gpus", "16",
                                    "--global-batch", "64", "--top", "3"], capsys)
    assert rc == 0 and "tok/s/dev" in out and "bottleneck" in out and "Young/Daly" in out


def test_plan_json(capsys):
    rc, out, _ = _run(main_plan, ["--model", "gpt2-124m", "--gpus", "8", "--json", "--top", "2"], capsys)
    data = json.loads(out)
    assert rc == 0 and len(data["layouts"]) == 2 and "run" in data
    assert data["layouts"][0]["peak_mem_gib"] > 0


@pytest.mark.parametrize("argv,needle", [
    (["--model", "gpt9"], "unknown model preset"),
    (["--model", "gpt3-13b", "--gpu", "a100-81gb"], "did you mean 'a100-80gb'"),
    (["--model", "gpt3-13b", "--gpus", "8", "--tp", "3", "--pp", "1"], "does not divide n_head"),
    (["--model", "gpt3-13b", "--gpus", "8", "--tp", "4", "--pp", "4"], "devices"),
    (["--model", "gpt3-175b", "--gpus", "8", "--global-batch", "8"], "no layout"),
    (["--model", "gpt2-124m", "--hardware", "no-such-file.toml"], "does not exist"),
])
def test_plan_errors_are_one_line(argv, needle, capsys):
    rc, _out, err = _run(main_plan, argv, capsys)
    assert rc == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_argparse_errors_exit_2(capsys):
    assert main_plan(["--gpus", "many"]) == 2
    assert capsys.readouterr().err == "error: argument --gpus: needs a number, got 'many'; see `scalelm plan --help`\n"


def test_evaluate_json_and_missing_file(capsys):
    rc, out, _ = _run(main_plan, ["evaluate", "tests/perf/data/dev_memory.csv", "--json"], capsys)
    data = json.loads(out)
    assert rc == 0 and data["rows"][0]["predicted_peak_mem_gib"] > 0
    rc, _, err = _run(main_plan, ["evaluate", "missing.csv"], capsys)
    assert rc == 2 and err.startswith("error: ")


def test_hw_list_and_show(capsys):
    rc, out, _ = _run(main_hw, ["list"], capsys)
    assert rc == 0 and "a100-80gb" in out and "tpu-v4" in out
    rc, out, _ = _run(main_hw, ["show", "h100-sxm-80gb"], capsys)
    assert rc == 0 and "989.4" in out
    rc, _, err = _run(main_hw, ["show", "z100"], capsys)
    assert rc == 2 and err.startswith("error: ")


def test_calibrate_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exc:
        main_calibrate(["--help"])
    assert exc.value.code == 0


def test_closed_pipe_exits_quietly(monkeypatch):
    """`scalelm plan ... | head`: the reader goes away; no traceback, exit 0."""

    class ClosedPipe:
        def write(self, _text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main_hw(["list"]) == 0
    assert main_plan(["evaluate", "tests/perf/data/dev_memory.csv"]) == 0


def test_human_units():
    from scalelm.perf.report import human_duration, human_energy, human_mass, human_usd

    assert [human_duration(s) for s in (30, 90, 7200, 3 * 86400)] == ["30 s", "1.5 min", "2 hours", "3 days"]
    assert [human_energy(k) for k in (0.5, 12, 8030)] == ["500 Wh", "12 kWh", "8.03 MWh"]
    assert [human_mass(k) for k in (0.0892, 5, 3130)] == ["89.2 g", "5 kg", "3.13 t"]
    assert [human_usd(u) for u in (0.531, 17867.2)] == ["$0.53", "$17,867"]


def test_short_run_summary_uses_small_units(capsys):
    rc, out, _ = _run(main_plan, ["--model", "gpt2-124m", "--gpus", "8", "--tokens", "1e8", "--top", "1"], capsys)
    assert rc == 0
    assert "0.0 days" not in out and "0.0 MWh" not in out and "0.0 t" not in out
    assert " min wall" in out and " Wh " in out and " g CO2e" in out


def test_evaluate_cv_source_json_gives_left_out_errors(capsys, tmp_path):
    lines = open("tests/perf/data/dev_runs.csv", newline="").read().splitlines(keepends=True)
    small = tmp_path / "two_sources.csv"
    small.write_text("".join(lines[:11] + [ln for ln in lines if ln.startswith("TORCHTITAN-T1")]))
    rc, out, _ = _run(main_plan, ["evaluate", str(small), "--cv", "source", "--json"], capsys)
    data = json.loads(out)
    assert rc == 0 and len(data["rows"]) == 13 and len(data["cv"]["knobs_by_left_out_source"]) == 2
    assert all(r["error_pct"] is not None for r in data["rows"])
    assert "interval_coverage_80" in data["summary"]


def test_write_fit_needs_cv(capsys, tmp_path):
    rc, _out, err = _run(main_plan, ["evaluate", "tests/perf/data/dev_runs.csv", "--write-fit",
                                     str(tmp_path / "f.toml")], capsys)
    assert rc == 2 and err.startswith("error: --write-fit needs --cv source")


def test_plan_prints_an_interval_and_takes_structured_flags(capsys):
    argv = ["--model", "gpt3-1.3b", "--gpu", "h100-sxm-80gb", "--gpus", "16", "--global-batch", "64", "--top", "1"]
    rc, out, _ = _run(main_plan, argv + ["--framework", "nemo", "--precision", "fp8", "--fp8-recipe", "delayed",
                                         "--no-flash-attention", "--json"], capsys)
    data = json.loads(out)
    lo, hi = data["interval_80"]["tokens_per_s_per_device"]
    assert rc == 0 and lo < data["layouts"][0]["tokens_per_s_per_device"] < hi
    rc, out, _ = _run(main_plan, argv, capsys)
    assert rc == 0 and "80% interval:" in out


def test_heterogeneous_cluster_from_the_command_line(capsys):
    argv = ["--model", "gpt3-6.7b", "--gpu", "a100-80gb:16", "--gpu", "h100-sxm-80gb:8", "--global-batch", "96"]
    rc, out, _ = _run(main_plan, argv + ["--json"], capsys)
    data = json.loads(out)
    times = [g["step_time_s"] for g in data["groups"]]
    assert rc == 0 and [g["devices"] for g in data["groups"]] == [16, 8]
    assert sum(g["layers"] for g in data["groups"]) == 32 and max(times) <= 1.10 * min(times)
    assert data["step_time_s"] == max(times)
    rc, out, _ = _run(main_plan, ["--model", "gpt3-125m", "--gpu", "a100-80gb:8", "--gpu", "h100-sxm-80gb:8"], capsys)
    assert rc == 0 and "a100-80gb" in out and "h100-sxm-80gb" in out and "layers" in out


@pytest.mark.parametrize("argv,needle", [
    (["--gpu", "a100-80gb:x"], "positive integer"),
    (["--gpu", "a100-80gb:8", "--gpu", "h100-sxm-80gb"], "give each a count"),
    (["--gpu", "a100-80gb:8", "--gpu", "h100-sxm-80gb:8", "--tp", "2"], "chooses each group's layout"),
    (["--gpu", "a100-80gb:8", "--gpus", "16"], "contradicts --gpus"),
    (["--framework", "caffe"], "invalid choice"),
])
def test_heterogeneous_and_framework_errors_are_one_line(argv, needle, capsys):
    rc, _out, err = _run(main_plan, ["--model", "gpt3-1.3b"] + argv, capsys)
    assert rc == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_evaluate_prints_a_warning_for_a_text_naming_two_systems(capsys, tmp_path):
    lines = open("tests/perf/data/dev_runs.csv", newline="").read().splitlines(keepends=True)
    row = lines[1].replace("Megatron-LM (PTD-P, 2021; DDP-impl torch)", "Megatron-LM model on DeepSpeed ZeRO-1")
    path = tmp_path / "two.csv"
    path.write_text(lines[0] + row)
    rc, out, _ = _run(main_plan, ["evaluate", str(path)], capsys)
    assert rc == 0 and "warning: NARAYANAN21-T1-1: framework text names megatron and deepspeed" in out
