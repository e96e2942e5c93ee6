"""Tiny models of both Hugging Face families, as scalelm checkpoints and as HF directories built locally from a
config (nothing is downloaded)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import MODEL_VARIANTS, TINY
from safetensors.torch import save_file

from scalelm.cli import main
from scalelm.data.corpus import bundled_texts
from scalelm.data.tokenizer import CharTokenizer
from scalelm.model import get_preset
from scalelm.model.gpt import GPT
from scalelm.train.checkpoint import unique_state

FAMILIES = {"llama": MODEL_VARIANTS["llama-like"], "gpt2": MODEL_VARIANTS["gpt2-like"]}
"""The tiny preset as each family: llama-like has grouped-query heads and a tied head, gpt2-like an untied one."""


@pytest.fixture(scope="session")
def corpus_tokenizer() -> CharTokenizer:
    """The bundled corpus's character vocabulary (the default dataset's), so imported models train on it."""
    return CharTokenizer.from_text("".join(text for _, text in bundled_texts()))


def scalelm_checkpoint(directory: Path, family: str, tokenizer, init_std: float = 0.3, seed: int = 0) -> GPT:
    """A random tiny model of `family` saved as a scalelm checkpoint directory (model.json, model.safetensors,
    tokenizer/). init_std 0.3 makes the logits peaked, so greedy choices are never near-ties."""
    cfg = replace(get_preset("tiny"), vocab_size=tokenizer.vocab_size, init_std=init_std, **FAMILIES[family])
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    directory.mkdir(parents=True)
    save_file(unique_state(model), str(directory / "model.safetensors"))
    (directory / "model.json").write_text(json.dumps(cfg.to_dict()))
    tokenizer.save(directory / "tokenizer")
    return model


def hf_model(directory: Path, family: str, vocab_size: int, tokenizer=None):
    """A tiny HF model of `family` from a config (transformers' own init), saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            bos_token_id=None, eos_token_id=None, initializer_range=0.2, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             rope_theta=500000.0, bos_token_id=None, eos_token_id=None, initializer_range=0.2)
        model = LlamaForCausalLM(config)
    model.eval().save_pretrained(str(directory))
    if tokenizer is not None:
        from scalelm.interop.hf_tokenizer import save_hf_tokenizer

        save_hf_tokenizer(tokenizer, directory, 64)
    return model


@pytest.fixture(scope="session")
def make_checkpoint():
    return scalelm_checkpoint


@pytest.fixture(scope="session")
def make_hf():
    return hf_model


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """A tiny model briefly trained on the bundled corpus: the pretrained model LoRA and classification start from."""
    run = tmp_path_factory.mktemp("pretrained") / "base"
    assert main(["train", "--out", str(run), *TINY, "--cpu.kernels", "false", "--train.eval_batches", "1",
                 "--train.steps", "30"]) == 0
    return run
