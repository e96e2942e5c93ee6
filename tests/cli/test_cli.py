"""The CLI as a user meets it: one-line errors with exit code 2, and the happy paths."""

import json
import os
import subprocess
import sys

import pytest
from helpers import metrics, train

from scalelm.cli import main


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "scalelm", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("args, expected", [
    (["train", "--train.stepz", "3"], "did you mean 'train.steps'"),
    (["train", "--train.steps", "ten"], "train.steps='ten' is not an integer"),
    (["train", "--train.steps", "0"], "train.steps=0 must be > 0"),
    (["train", "--model.preset", "gpt2"], "unknown model preset 'gpt2'"),
    (["train", "--optim.schedule", "cosin"], "did you mean 'cosine'"),
    (["train", "--train.global_batch", "6", "--train.micro_batch", "4"], "does not divide train.global_batch=6"),
    (["train", "--config", "missing.toml"], "config file 'missing.toml' not found"),
    (["train", "--model.preset", "tiny", "--train.seq_len", "999"], "exceeds model.max_seq_len=64"),
    (["train", "--device", "tpu"], "is not one of: auto, cpu, cuda"),
    (["train", "--model.n_head", "5"], "does not divide model.d_model"),
    (["trian"], "did you mean 'train'"),
    (["generate", "no-such-run"], "no checkpoint found"),
    (["prepare", "no-such-file.txt", "--out", "ds"], "no-such-file.txt"),
    (["info", "llama9"], "unknown model preset"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, expected, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    result = run_cli("train", "--train.stepz", "3", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_bad_toml_names_the_file(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("[train]\nsteps = \n")
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def test_config_file_then_flags(tmp_path):
    (tmp_path / "c.toml").write_text('[model]\npreset = "tiny"\n[train]\nsteps = 5\nlog_every = 5\n')
    from scalelm.config import build_config, load_toml

    cfg = build_config(load_toml(tmp_path / "c.toml"), {"train.steps": "3"})
    assert cfg.model.preset == "tiny" and cfg.train.steps == 3 and cfg.train.log_every == 5


def test_bundled_configs_load():
    from pathlib import Path

    from scalelm.config import build_config, load_toml

    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        build_config(load_toml(path))


def test_generate_eval_and_report_from_a_trained_run(tmp_path, capsys):
    from scalelm.data import load_tokenizer

    run = tmp_path / "run"
    train(run, "--train.steps", "3", "--train.log_every", "1")
    end = metrics(run)[-1]
    capsys.readouterr()
    tokenizer = load_tokenizer(run / "tokenizer")

    def generate(*args: str) -> str:
        assert main(["generate", str(run), "--prompt", "ROMEO:", *args]) == 0
        out = capsys.readouterr().out
        assert out.endswith("\n")
        return out[:-1]  # print's newline; the text itself may contain newlines

    for n in (0, 1, 20):
        text = generate("--max-new-tokens", str(n), "--seed", "3")  # the continuation alone
        assert len(tokenizer.encode(text)) == n and len(text) == n  # the char tokenizer: a token per character
    hot = ("--max-new-tokens", "20", "--temperature", "1.0")
    first = generate(*hot, "--seed", "7")
    assert generate(*hot, "--seed", "7") == first  # the same seed, the same text
    assert any(generate(*hot, "--seed", str(seed)) != first for seed in (8, 9, 10))  # other seeds sample others
    greedy = generate("--max-new-tokens", "30", "--greedy")
    assert generate("--max-new-tokens", "30", "--greedy", "--no-cache") == greedy
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"val_loss", "perplexity", "bits_per_token", "tokens"}
    assert abs(result["val_loss"] - end["val_loss"]) < 1e-4  # what the trainer logged for the same weights
    assert result["tokens"] == 10 * 8 * 32  # eval_batches x min(32, global_batch 8) windows x seq_len
    assert main(["report", str(run)]) == 0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    (tmp_path / "empty.txt").write_text("")
    for bad, message in ((["--prompt", "A" * 300], "the model's context is 64"),
                         (["--prompt-file", str(tmp_path / "empty.txt")], "is empty"),
                         (["--prompt", "ROMEO", "--top-p", "2"], "top_p=2.0 must be in (0, 1]")):
        capsys.readouterr()
        assert main(["generate", str(run), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert main(["generate", str(tmp_path / "run"), "--prompt", "\u2603"]) == 2


def test_info_prints_presets(capsys):
    assert main(["info", "gpt2-124m"]) == 0
    assert "124,439,808" in capsys.readouterr().out


def test_prepare_then_train_on_own_text(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("to be or not to be, that is the question\n" * 200)
    assert main(["prepare", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert "char tokenizer" in out and "train 7,380, val 820" in out
    assert train(tmp_path / "run", "--data.path", str(tmp_path / "ds"), "--train.steps", "2",
                 "--train.log_every", "1") == 0
