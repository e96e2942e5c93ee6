"""Tensor-parallel generation: two ranks generate exactly the tokens one process does, with the same logits, for a
GQA + RoPE model and a GPT-2-like one (learned positions, LayerNorm, GELU, biases, tied embeddings); a model that
tp does not divide is refused with a message that says which numbers of processes work."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_multiprocess, train

from scalelm.infer import GenerationError, Generator
from scalelm.infer.load import load_for_inference
from scalelm.infer.tp import check_run_tp, generate_tp, shard_for_generation
from scalelm.model import get_preset
from scalelm.model.gpt import GPT

HERE = Path(__file__).parent
SRC = HERE.parents[1] / "src"
VARIANTS = {
    "gqa-rope": [],
    "gpt2-like": ["--model.pos", "learned", "--model.norm", "layernorm", "--model.mlp", "gelu",
                  "--model.bias", "true", "--model.n_kv_head", "4"],
}


def _load_worker():
    """tp_worker.py as a module: the tp=1 reference runs its generation code in this process."""
    spec = importlib.util.spec_from_file_location("tp_worker", HERE / "tp_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp_runs")
    for name, flags in VARIANTS.items():
        assert train(root / name, "--train.steps", "3", *flags) == 0
    return {name: root / name for name in VARIANTS}


@pytest.fixture(scope="module")
def tp2(runs, tmp_path_factory) -> dict[str, dict]:
    """What the worker generated on 2 ranks, by (variant, mode): one torchrun launch for all."""
    out = tmp_path_factory.mktemp("tp2") / "tp2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "tp_worker.py"), str(out), *(str(runs[name]) for name in VARIANTS)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), *sys.path]), OMP_NUM_THREADS="1")
    result = run_multiprocess(cmd, env=env, timeout=300)
    assert result.returncode == 0, f"the tp=2 worker failed:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    written = json.loads(out.read_text())
    return {(name, mode): written[f"{runs[name]} {mode}"] for name in VARIANTS for mode in worker.MODES}


def _one_process(run: Path, mode: str):
    """(tokens, logits of every forward), tokenizer of the tp=1 generation the worker runs on every rank."""
    model, tokenizer = load_for_inference(run)
    generator = Generator(model, tokenizer)
    return worker.generate_with_logits(generator.generate, worker.PROMPTS, max_new_tokens=worker.NEW_TOKENS,
                                       **worker.MODES[mode]), tokenizer


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_generate_the_tokens_and_logits_of_one_process(runs, tp2, variant, mode):
    """Greedy tokens must be equal; so must the seeded sample's, which are varied (the greedy ones of a model
    trained 3 steps repeat one token): the logits differ by float rounding alone, so a draw would have to land
    within that distance of a boundary between two tokens to differ."""
    (tokens, logits), tokenizer = _one_process(runs[variant], mode)
    got = tp2[variant, mode]
    assert got["world"] == 2
    if mode == "greedy":  # an exact comparison is only meaningful where no two tokens nearly tie for the top
        top2 = torch.tensor(logits)[..., :tokenizer.vocab_size].topk(2, dim=-1).values
        assert (top2[..., 0] - top2[..., 1]).min() > 1e-4, "a near tie between the two likeliest tokens"
    assert got["tokens"] == tokens
    assert len(got["logits"]) == len(logits) == worker.NEW_TOKENS  # the prefill, then a forward per decode step
    # the first decode step (the first forward that reads the KV cache), then every step
    torch.testing.assert_close(torch.tensor(got["logits"][1]), torch.tensor(logits[1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(logits), rtol=0, atol=1e-5)


def test_generate_tp_in_one_process_is_the_generator(runs):
    """Without torchrun, generate_tp runs the whole model in this process: the Generator's completions."""
    (tokens, _), _ = _one_process(runs["gqa-rope"], "sampled")
    completions = generate_tp(runs["gqa-rope"], worker.PROMPTS, max_new_tokens=worker.NEW_TOKENS,
                              **worker.MODES["sampled"])
    assert [c.tokens for c in completions] == tokens


@pytest.mark.parametrize("tp, names", [(3, "model.n_head=4"), (4, "model.n_kv_head (key/value heads)=2")])
def test_a_model_tp_does_not_divide_is_refused(tp, names):
    model = GPT(get_preset("tiny")).eval()  # 4 heads, 2 kv heads, MLP width 64, vocabulary 128
    with pytest.raises(GenerationError, match=r"does not divide .*; use a number of processes \(--nproc\) among "
                                              r"\[1, 2\]") as error:
        shard_for_generation(model, tp)
    assert names in str(error.value)


def test_tp_must_be_the_size_of_the_process_group():
    with pytest.raises(GenerationError, match="needs a process group of exactly 2 ranks, this one has 1"):
        shard_for_generation(GPT(get_preset("tiny")), 2)


def test_a_run_is_checked_from_its_config_before_any_process_starts(runs):
    check_run_tp(runs["gqa-rope"], 2)
    with pytest.raises(GenerationError, match=r"does not divide model.n_head=4"):
        check_run_tp(runs["gqa-rope"], 3)
