"""ONNX export in onnxruntime and OpenVINO: logits within 1e-4 of PyTorch for two batch sizes × two sequence
lengths, with and without the KV cache, and the engine generating the same tokens through either runtime."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import MODEL_VARIANTS
from serve.server import tiny_run

from scalelm.cli import main
from scalelm.infer import Generator, Sampling
from scalelm.infer.load import load_for_inference
from scalelm.infer.onnx_export import cache_names, export_onnx
from scalelm.infer.onnx_runtime import RUNTIMES, OnnxModel
from scalelm.model import get_preset
from scalelm.model.gpt import GPT

SHAPES = [(1, 5), (3, 17)]  # (batch, sequence length)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-layer Llama-like run (grouped-query heads, RoPE, RMSNorm, SwiGLU), exported with its cache."""
    return tiny_run(tmp_path_factory.mktemp("onnx") / "run", max_seq_len=64, n_layer=1)


@pytest.fixture(scope="module")
def cached_file(run):
    out = run.parent / "cached.onnx"
    assert main(["export", "onnx", str(run), "--out", str(out), "--with-cache"]) == 0
    return out


@pytest.fixture(scope="module")
def gpt2_like(tmp_path_factory):
    """A one-layer GPT-2-like model (learned positions, LayerNorm, GELU, biases) and its plain export."""
    torch.manual_seed(0)
    model = GPT(replace(get_preset("tiny"), vocab_size=64, n_layer=1, **MODEL_VARIANTS["gpt2-like"])).eval()
    return model, export_onnx(model, tmp_path_factory.mktemp("onnx") / "plain.onnx")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_plain_graph_logits_match_pytorch(gpt2_like, runtime):
    model, path = gpt2_like
    onnx_model = OnnxModel(path, runtime)
    for batch, seq in SHAPES:
        ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            torch.testing.assert_close(onnx_model(ids), model(ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_cache_graph_prefill_and_decode_match_pytorch(run, cached_file, runtime):
    model, _ = load_for_inference(run)
    onnx_model = OnnxModel(cached_file, runtime)
    cfg = model.cfg
    past_names, _ = cache_names(cfg.n_layer)
    for batch, seq in SHAPES:
        ids = torch.randint(0, 64, (batch, seq + 1), generator=torch.Generator().manual_seed(seq))
        empty = np.zeros((batch, cfg.kv_heads, 0, cfg.dim_head), dtype=np.float32)
        prefill = onnx_model._run({"input_ids": ids[:, :seq].numpy(), "attention_mask": np.ones((batch, seq), np.int64),
                                   **{name: empty for name in past_names}})
        decode = onnx_model._run({"input_ids": ids[:, seq:].numpy(),
                                  "attention_mask": np.ones((batch, seq + 1), np.int64),
                                  **dict(zip(past_names, prefill[1:]))})
        with torch.no_grad():
            want = model(ids)
        torch.testing.assert_close(torch.from_numpy(prefill[0]), want[:, :seq], rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(decode[0]), want[:, seq:], rtol=0, atol=1e-4)
        assert decode[1].shape == (batch, cfg.kv_heads, seq + 1, cfg.dim_head)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_engine_generates_pytorchs_tokens_through_the_runtime(run, cached_file, runtime):
    """A left-padded batch of different prompt lengths, greedy: the same tokens as the PyTorch model."""
    model, tokenizer = load_for_inference(run)
    prompts = ["Hello there", "a", "To be or not to be"]
    want = Generator(model, tokenizer).generate(prompts, 12, Sampling(0.0))
    got = Generator(OnnxModel(cached_file, runtime), tokenizer).generate(prompts, 12, Sampling(0.0))
    assert [c.tokens for c in got] == [c.tokens for c in want]


def test_generate_cli_runs_the_export(run, cached_file, capsys):
    model, tokenizer = load_for_inference(run)
    want = Generator(model, tokenizer).generate("Hi", 6, Sampling(0.0))[0].text
    assert main(["generate", str(run), "--runtime", "openvino", "--onnx", str(cached_file), "--greedy",
                 "--prompt", "Hi", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_generate_cli_refuses_what_the_runtime_cannot_run(run, gpt2_like, capsys):
    plain = gpt2_like[1]
    assert main(["generate", str(run), "--runtime", "onnxruntime", "--onnx", str(plain), "--greedy"]) == 2
    assert "--with-cache" in capsys.readouterr().err
    assert main(["generate", str(run), "--runtime", "onnxruntime", "--onnx", str(run / "none.onnx")]) == 2
    assert "no ONNX file" in capsys.readouterr().err
    assert main(["generate", str(run), "--runtime", "openvino", "--compile"]) == 2
    assert "--compile works with --runtime pytorch only" in capsys.readouterr().err
