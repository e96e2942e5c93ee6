"""A CLI that never surprises: every subcommand's usage mistakes are one line `error: ...` with exit code 2,
--help works anywhere, `scalelm` alone lists the commands, booleans take --KEY / --no-KEY, `scalelm slurm`
refuses flags it does not know, and only `train` promises a checkpoint on Ctrl-C. In-process through main()."""

import dataclasses
import os
import subprocess
import sys

import pytest

from scalelm import cli
from scalelm.cli import COMMANDS, USAGE, main
from scalelm.config import SECTIONS, Config, ConfigError, build_config, parse_overrides
from scalelm.config.load import bool_keys

BAD_INPUT = {
    "train": [["--train.stepz", "3"], ["--train.steps", "ten"], ["--no-train.steps"], ["stray"]],
    "slurm": [["--nodez", "2"], ["--nodes", "x"], ["--nodes", "0"], ["-x"]],
    "prepare": [["a.txt", "--out", "ds", "--bogus"], ["a.txt"], [], ["a.txt", "--out", "ds", "--tokenizer", "xx"],
                ["a.txt", "--out", "ds", "--vocab-size", "many"]],
    "generate": [["run", "--bogus"], [], ["run", "--max-new-tokens", "x"], ["run", "--max-new-tokens", "-1"],
                 ["run", "--top-p", "2"], ["run", "--temperature", "-1"], ["no-such-run"]],
    "eval": [["run", "--bogus"], [], ["no-such-run"]],
    "info": [["--bogus"], ["--seq", "x"], ["llama9"]],
    "report": [["run", "--bogus"], [], ["no-such-run"]],
    "plan": [["--gpuz", "8"], ["--gpus", "many"], ["--precision", "fp7"], ["--model", "gpt9"]],
    "plan evaluate": [["runs.csv", "--jsn"], [], ["missing.csv"]],
    "hw": [["list", "--bogus"], [], ["show"], ["lst"], ["show", "z100"]],
    "calibrate": [["--quik"], ["--quick=yes"], ["--out"]],
    "export hf": [[], ["run"], ["no-such-run", "--out", "hf"], ["run", "--out", "hf", "--dtype", "fp7"]],
    "import": [["hf"], ["onnx", "d", "--out", "o"], ["hf", "nowhere", "--out", "o"]],
    "merge": [[], ["no-such-run", "--out", "o"], ["run", "--bogus"]],
    "finetune-classify": [["--init-from", "run"], ["--data", "x.jsonl"], ["--data"],
                          ["--data", "x.jsonl", "--init-from", "run", "--val-fraction", "half"]],
    "classify": [[], ["run"], ["no-such-run", "--text", "x"]],
    "export onnx": [[], ["run", "--out", "m.onnx", "--bogus"], ["no-such-run", "--out", "m.onnx"]],
    "serve": [[], ["run", "--bogus"], ["run", "--port", "x"]],
    "quantize": [[], ["run", "--bits", "8", "--out", "q", "--bogus"], ["run", "--bits", "3", "--out", "q"]],
    "prune": [[], ["run", "--method", "wanda", "--out", "p", "--bogus"],
              ["run", "--method", "wanda", "--sparsity", "1.5", "--out", "p"]],
    "distill": [[], ["--teacher", "t", "--student", "s", "--bogus"], ["--teacher", "no-such-run", "--student", "s"]],
}


def test_every_command_has_bad_input_cases():
    assert {command.split()[0] for command in BAD_INPUT} == set(COMMANDS)


@pytest.mark.parametrize("argv", [command.split() + args for command, cases in BAD_INPUT.items() for args in cases],
                         ids=lambda argv: " ".join(argv) or "-")
def test_bad_input_is_one_error_line_exit_2(argv, tmp_path, monkeypatch, capsys):
    """Wrong flag, missing required argument (where the command has one) and bad value, for every subcommand."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2  # argparse's errors included: no SystemExit out of main
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: ")
    assert "Traceback" not in err and "usage:" not in err and out == ""


@pytest.mark.parametrize("argv, message", [
    (["prepare", "a.txt"], "the following arguments are required: --out; see `scalelm prepare --help`"),
    (["plan", "--gpus", "many"], "argument --gpus: needs a number, got 'many'; see `scalelm plan --help`"),
    (["plan", "evaluate"], "required: file; see `scalelm plan evaluate --help`"),
    (["hw", "show"], "required: name; see `scalelm hw show --help`"),
    (["generate", "run", "--top_k", "5"], "unrecognized arguments: --top_k 5; see `scalelm generate --help`"),
])
def test_argparse_errors_say_where_to_look(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_no_arguments_lists_the_commands_and_trains_nothing(monkeypatch, capsys):
    def refuse(argv):
        raise AssertionError("`scalelm` alone must not train")

    monkeypatch.setitem(cli.COMMANDS, "train", refuse)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.strip() == USAGE and all(f"  {name} " in out for name in cli.COMMANDS)


def test_options_without_a_command_are_one_line(capsys):
    assert main(["--train.steps", "5"]) == 2
    assert capsys.readouterr().err == "error: --train.steps needs a command before it, e.g. `scalelm train " \
        f"--train.steps ...` (commands: {', '.join(COMMANDS)})\n"


@pytest.mark.parametrize("argv, usage", [
    (["train", "--train.steps", "5", "--help"], "usage: scalelm train"),
    (["train", "--train.steps", "ten", "-h"], "usage: scalelm train"),
    (["slurm", "--nodes", "2", "--help"], "usage: scalelm slurm"),
    (["slurm", "--nodez", "2", "--", "--help"], "usage: scalelm slurm"),
    (["prepare", "--help"], "usage: scalelm prepare"),
    (["generate", "run", "--max-new-tokens", "x", "--help"], "usage: scalelm generate"),
    (["info", "-h"], "usage: scalelm info"),
    (["report", "--help"], "usage: scalelm report"),
    (["plan", "--model", "x", "--help"], "usage: scalelm plan"),
    (["plan", "--gpus", "many", "--help"], "usage: scalelm plan"),
    (["plan", "evaluate", "--help"], "usage: scalelm plan evaluate"),
    (["hw", "--help"], "usage: scalelm hw"),
    (["hw", "show", "x", "--help"], "usage: scalelm hw show"),
    (["calibrate", "--quick", "--help"], "usage: scalelm calibrate"),  # shows help, measures nothing
    (["help", "plan"], "usage: scalelm plan"),
])
def test_help_anywhere_shows_the_commands_help(argv, usage, capsys):
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith(usage) and err == ""


# ---- booleans: --KEY / --no-KEY --------------------------------------------------------------------------
def test_boolean_keys_come_from_the_type_hints():
    keys = bool_keys()
    declared = {f"{section}.{f.name}" for section in SECTIONS
                for f in dataclasses.fields(getattr(Config(), section)) if f.type in ("bool", bool)}
    assert declared and declared <= keys
    assert {"train.compile", "metrics.progress", "model.tie_embeddings", "parallel.auto"} <= keys
    assert not {"train.steps", "optim.lr", "seed", "out", "train.dtype"} & keys


@pytest.mark.parametrize("argv, compile_, progress", [
    (["--train.compile"], True, True),
    (["--no-train.compile"], False, True),
    (["--train.compile", "true", "--no-metrics.progress"], True, False),
    (["--train.compile", "false"], False, True),
    (["--train.compile=false", "--metrics.progress=no"], False, False),
    (["--train.compile", "--metrics.progress", "--train.steps", "3"], True, True),
    (["--no-metrics.progress", "--train.compile"], True, False),  # a flag as the last argument
])
def test_boolean_flags(argv, compile_, progress):
    cfg = build_config({}, parse_overrides(argv))
    assert (cfg.train.compile, cfg.metrics.progress) == (compile_, progress)


def test_values_still_work_negative_numbers_included():
    assert parse_overrides(["--optim.lr", "-1e-3", "--seed=-7", "--train.steps", "-5", "--out", "r"]) == \
        {"optim.lr": "-1e-3", "seed": "-7", "train.steps": "-5", "out": "r"}
    assert build_config({}, parse_overrides(["--seed", "-7"])).seed == -7


@pytest.mark.parametrize("argv, message", [
    (["--no-train.steps"], "--no-train.steps: only boolean keys take --no-, and train.steps is not one; set it with "
                           "--train.steps VALUE"),
    (["--no-train.compil"], "unknown config key 'train.compil'; did you mean 'train.compile'?"),
    (["--no-train.compile=true"], "--no-train.compile=true takes no value"),
    (["--train.steps"], "--train.steps needs a value"),
    (["--train.steps", "--train.compile"], "--train.steps needs a value"),
    (["--train.compile", "maybe"], "train.compile='maybe' is not a boolean; use true or false"),
])
def test_boolean_flag_mistakes(argv, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        build_config({}, parse_overrides(argv))


def test_no_key_for_a_number_is_one_line_from_train(capsys):
    assert main(["train", "--no-train.steps"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only boolean keys take --no-" in err


# ---- slurm: its own options, train's arguments, nothing else --------------------------------------------
def test_slurm_names_an_unknown_flag(capsys):
    assert main(["slurm", "--nodez", "2", "--model.preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown option --nodez for `scalelm slurm`; did you mean --nodes?")
    assert err.count("\n") == 1


def test_slurm_passes_train_arguments_through(capsys):
    assert main(["slurm", "--nodes", "2", "--nproc-per-node", "2", "--gpus-per-node", "0", "--script", "-",
                 "--model.preset", "tiny", "--no-train.compile", "--seed=-3", "--parallel.tp", "2", "--",
                 "--train.steps", "3", "--out", "runs/t"]) == 0
    out = capsys.readouterr().out
    assert ("-m scalelm train --model.preset tiny --no-train.compile --seed=-3 --parallel.tp 2 --train.steps 3 "
            "--out runs/t") in out


def test_slurm_train_arguments_are_still_validated(capsys):
    assert main(["slurm", "--script", "-", "--train.stepz", "3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err


# ---- Ctrl-C --------------------------------------------------------------------------------------------
def _interrupt(argv):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command, message", [
    ("train", "interrupted; the last checkpoint is intact — run the same command to resume\n"),
    ("info", "interrupted\n"),
    ("plan", "interrupted\n"),
    ("prepare", "interrupted\n"),
])
def test_only_train_promises_a_checkpoint_on_interrupt(command, message, monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, command, _interrupt)
    assert main([command]) == 130
    assert capsys.readouterr().err == message


def test_a_real_process(tmp_path):
    """`python -m scalelm` as a shell runs it: the list and exit 0 alone; argparse's errors one line, exit 2."""
    def run(*args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        return subprocess.run([sys.executable, "-m", "scalelm", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)

    alone = run()
    assert alone.returncode == 0 and alone.stdout.strip() == USAGE and alone.stderr == ""
    bad = run("prepare", "a.txt")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "error: the following arguments are required: --out; see `scalelm prepare --help`\n"
