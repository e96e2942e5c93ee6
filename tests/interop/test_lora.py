"""LoRA: a small share of the parameters trains, checkpoints hold the adapters alone, merging gives the adapted
model's logits, and peft loads the exported adapter onto the HF export with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, metrics
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import scalelm
from scalelm.cli import main
from scalelm.config import ConfigError, build_config, resolve_optimizer
from scalelm.data import default_dataset, eval_batches, open_split
from scalelm.interop import export_hf
from scalelm.interop.merge import load_lora_model
from scalelm.model import get_preset
from scalelm.model.gpt import GPT
from scalelm.train.lora import apply_lora, merge_lora

FT = [*TINY[2:], "--cpu.kernels", "false", "--train.eval_batches", "1"]
"""The tests' training flags without a preset: the model follows --init-from."""


def test_rank_8_trains_under_one_percent_of_gpt2_124m():
    with torch.device("meta"):
        model = GPT(get_preset("gpt2-124m"))
    total = model.num_params()
    adapted = apply_lora(model, rank=8, alpha=16, targets="q,v")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(adapted) == 24 and trainable == 12 * 2 * 8 * (768 + 768)
    assert trainable / total < 0.01


def test_merged_logits_equal_the_adapted_model(tmp_path):
    torch.manual_seed(0)
    model = GPT(get_preset("tiny")).eval()
    apply_lora(model, rank=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)  # B is zero at the start: give the adapters something to add
    ids = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        adapted = model(ids)
        merged = merge_lora(model)(ids)
    assert (adapted - merged).abs().max().item() < 1e-5
    assert sorted(model.state_dict()) == sorted(GPT(get_preset("tiny")).state_dict())  # the plain model again


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapters_alone_are_checkpointed_merged_and_load_in_peft(family, tmp_path, corpus_tokenizer,
                                                                 make_checkpoint):
    make_checkpoint(tmp_path / "base", family, corpus_tokenizer, init_std=0.1)
    run = tmp_path / "lora"
    targets = "q,v,o,w1" if family == "llama" else "q,k,v,o,w2"
    args = ["train", "--out", str(run), *FT, "--init-from", str(tmp_path / "base"), "--lora.rank", "4",
            "--lora.alpha", "8", "--lora.targets", targets, "--optim.lr", "1e-2"]
    assert main([*args, "--train.steps", "6"]) == 0
    saved = load_file(str(run / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert saved and all(".lora_A" in k or ".lora_B" in k for k in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if k.endswith("lora_B"))  # the adapters trained
    assert main([*args, "--train.steps", "8"]) == 0  # resumes from the adapters-only checkpoint
    assert [r["step"] for r in metrics(run) if "loss" in r] == [6, 8]  # the second run went on from step 6

    adapted = load_lora_model(run)
    ids = torch.randint(0, corpus_tokenizer.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = adapted(ids)
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        assert (scalelm.load(tmp_path / "merged")(ids) - expected).abs().max().item() < 1e-5

    export_hf(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ids).logits - scalelm.load(tmp_path / "base")(ids)).abs().max().item() < 1e-4  # the base alone
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "hf" / "adapter").eval()
        assert (peft_model(ids).logits - expected).abs().max().item() < 1e-4


def held_out_loss(path) -> float:
    """Mean loss of the model at `path` on fixed windows of the bundled corpus's validation split."""
    model = scalelm.load(path)
    total = 0.0
    batches = eval_batches(open_split(default_dataset(), "val"), 32, 32, 4)
    with torch.no_grad():
        for x, y in batches:
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    return total / len(batches)


def test_lora_fine_tuning_lowers_held_out_loss(base_run, tmp_path):
    run = tmp_path / "lora"
    assert main(["train", "--out", str(run), *FT, "--init-from", str(base_run), "--lora.rank", "8",
                 "--lora.targets", "all-linear", "--train.steps", "30", "--optim.lr", "1e-2"]) == 0
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    before, after = held_out_loss(base_run), held_out_loss(tmp_path / "merged")
    assert after < before - 0.01, (before, after)


def test_lora_mistakes_are_one_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), *FT, "--lora.rank", "4"]) == 2
    assert "lora.rank needs --init-from" in capsys.readouterr().err


def test_lora_runs_train_with_adamw():
    cfg = build_config({}, {"init_from": "runs/base", "lora.rank": "8"})
    assert resolve_optimizer(cfg) == "adamw"
    with pytest.raises(ConfigError, match="LoRA adapters train with AdamW"):
        build_config({}, {"init_from": "runs/base", "lora.rank": "8", "optim.name": "muon"})
