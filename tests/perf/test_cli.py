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
    assert capsys.readouterr().err == "error: argument --gpus: invalid int value: 'many'; see `scalelm plan --help`\n"


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
