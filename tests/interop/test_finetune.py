"""Fine-tuning with --init-from: Hugging Face GPT-2 and Llama models built locally start the run from their own
weights (the first step's loss is HF's loss on that batch), train on the bundled corpus with a fresh optimizer
(the loss falls) in one process and in dp2; a model that does not fit the weights is one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, losses, run_multiprocess

from scalelm.cli import main
from scalelm.data import BatchLoader, CharTokenizer, default_dataset, open_split

FT = [*TINY[2:], "--cpu.kernels", "false", "--train.eval_batches", "1", "--train.steps", "20",
      "--train.log_every", "1", "--optim.lr", "3e-3"]
"""20 steps of the tests' tiny training, without a preset: the model follows --init-from."""
SRC = Path(__file__).resolve().parents[2] / "src"


def hf_first_loss(hf) -> float:
    """HF's own mean cross-entropy on the run's first batch (seed 1337, 8 windows of 32 tokens)."""
    x, y = BatchLoader(open_split(default_dataset(), "train"), 32, 8, 1337).batch_at(0)
    with torch.no_grad():
        logits = hf(x).logits
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


def falls(run: Path) -> bool:
    curve = losses(run)
    return len(curve) == 20 and sum(curve[s] for s in range(16, 21)) < sum(curve[s] for s in range(1, 6)) - 0.2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_models_fine_tune_from_their_weights(family, tmp_path, corpus_tokenizer, make_hf):
    hf = make_hf(tmp_path / "hf", family, 96, corpus_tokenizer)
    assert main(["train", "--out", str(tmp_path / "run"), *FT, "--init-from", str(tmp_path / "hf")]) == 0
    assert abs(losses(tmp_path / "run")[1] - hf_first_loss(hf)) < 1e-4
    assert falls(tmp_path / "run")


@pytest.mark.multiproc
@pytest.mark.slow
def test_dp2_fine_tunes_from_the_same_weights(tmp_path, corpus_tokenizer, make_hf):
    hf = make_hf(tmp_path / "hf", "llama", 96, corpus_tokenizer)
    first = hf_first_loss(hf)  # also prepares the bundled dataset once, before the ranks look for it
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), *sys.path]), OMP_NUM_THREADS="1")
    result = run_multiprocess([sys.executable, "-m", "scalelm", "train", "--nproc", "2", "--out", str(tmp_path / "dp2"),
                               *FT, "--init-from", str(tmp_path / "hf")], env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert abs(losses(tmp_path / "dp2")[1] - first) < 1e-4
    assert falls(tmp_path / "dp2")


def test_a_model_that_does_not_fit_the_weights_is_one_line(tmp_path, corpus_tokenizer, make_hf, capsys):
    make_hf(tmp_path / "hf", "gpt2", 96, corpus_tokenizer)
    capsys.readouterr()  # transformers' own progress lines
    assert main(["train", "--out", str(tmp_path / "run"), *FT, "--init-from", str(tmp_path / "hf"),
                 "--model.d_model", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is [96, 32] there but [96, 64] in the configured model" in err
    assert main(["train", "--out", str(tmp_path / "run"), *FT, "--init-from", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_dataset_with_another_tokenizer_is_one_line(tmp_path, corpus_tokenizer, make_checkpoint, capsys):
    shifted = CharTokenizer(sorted([*corpus_tokenizer.chars, "\x01"]))  # every id one higher than the dataset's
    make_checkpoint(tmp_path / "ck", "llama", shifted)
    assert main(["train", "--out", str(tmp_path / "run"), *FT, "--init-from", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "encodes text with another tokenizer than the dataset" in err
