"""Hugging Face export and import, checked by transformers itself: exported models load with AutoModelForCausalLM
and compute scalelm's logits and greedy tokens, tokenizers load with AutoTokenizer and encode to the same ids,
HF models built locally import with HF's logits, and import → export gives back the same tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import scalelm
from scalelm.cli import main
from scalelm.data.tokenizer import BPETokenizer
from scalelm.infer import Generator, Sampling
from scalelm.interop import export_hf
from scalelm.model.hf_layout import FormatError, model_config_from_hf

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_loads_in_transformers_with_the_same_logits_tokens_and_ids(family, tmp_path, corpus_tokenizer,
                                                                         make_checkpoint):
    model = make_checkpoint(tmp_path / "ck", family, corpus_tokenizer)
    assert main(["export", "hf", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    ids = torch.randint(0, corpus_tokenizer.vocab_size, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4

    prompt = corpus_tokenizer.encode("ROMEO:")
    hf_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False)[0, len(prompt):].tolist()
    ours = Generator(model, corpus_tokenizer).generate("ROMEO:", 50, Sampling(temperature=0))[0].tokens
    assert len(ours) == 50 and hf_tokens == ours

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer(TEXT)["input_ids"] == corpus_tokenizer.encode(TEXT)
    assert tokenizer.decode(corpus_tokenizer.encode(TEXT)) == TEXT


def test_bpe_tokenizer_encodes_the_same_ids_in_transformers(tmp_path, make_checkpoint):
    bpe = BPETokenizer.train([TEXT * 20 + "Juliet is the sun. Arise, fair sun!\n" * 10], 300)
    make_checkpoint(tmp_path / "ck", "llama", bpe)
    export_hf(tmp_path / "ck", tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sample = "Arise, fair Romeo! what light? ünïcode ✓"
    assert tokenizer(sample)["input_ids"] == bpe.encode(sample)
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_models_import_with_their_logits_and_export_back_bit_exact(family, tmp_path, corpus_tokenizer, make_hf):
    hf = make_hf(tmp_path / "hf", family, 96, corpus_tokenizer)
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    model = scalelm.load(tmp_path / "run")
    ids = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4
    assert Generator(model, corpus_tokenizer).tokenizer.encode(TEXT) == corpus_tokenizer.encode(TEXT)

    export_hf(tmp_path / "run", tmp_path / "back")
    original, back = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" /
                                                                                          "model.safetensors"))
    assert sorted(back) == sorted(original)
    assert all(torch.equal(original[k], back[k]) and original[k].dtype == back[k].dtype for k in original)
    assert (tmp_path / "back" / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()


def test_unsupported_architectures_and_options_are_one_line(tmp_path, corpus_tokenizer, make_checkpoint, capsys):
    with pytest.raises(FormatError, match="model_type='mistral'"):
        model_config_from_hf({"model_type": "mistral"})
    with pytest.raises(FormatError, match="RoPE scaling 'llama3'"):
        model_config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "llama3"}})
    with pytest.raises(FormatError, match="activation_function='gelu'"):
        model_config_from_hf({"model_type": "gpt2", "activation_function": "gelu"})

    model_dir = tmp_path / "ck"
    make_checkpoint(model_dir, "llama", corpus_tokenizer)
    cfg = json.loads((model_dir / "model.json").read_text())
    (model_dir / "model.json").write_text(json.dumps(dict(cfg, pos="sinusoidal")))
    assert main(["export", "hf", str(model_dir), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pos=sinusoidal" in err and "Llama needs RoPE" in err
    assert not (tmp_path / "hf").exists()

    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    assert main(["import", "hf", str(tmp_path / "mistral"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_type='mistral'" in err and not (tmp_path / "run").exists()


def test_export_never_overwrites(tmp_path, corpus_tokenizer, make_checkpoint, capsys):
    make_checkpoint(tmp_path / "ck", "gpt2", corpus_tokenizer)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert main(["export", "hf", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]
