from dataclasses import replace

import pytest
import torch
from helpers import MODEL_VARIANTS as VARIANTS
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scalelm.model import PRESETS, get_preset
from scalelm.model.counting import flops_per_token, num_params
from scalelm.model.gpt import GPT


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_mask_later_tokens_do_not_change_earlier_logits(variant):
    torch.manual_seed(0)
    model = GPT(replace(get_preset("tiny"), **VARIANTS[variant])).eval()
    ids = torch.randint(0, 128, (2, 32))
    changed = ids.clone()
    changed[:, 20:] = torch.randint(0, 128, (2, 12))
    a, b = model(ids), model(changed)
    assert a.shape == (2, 32, 128)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_of_built_model_equals_closed_form(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == num_params(cfg)
    assert model.num_params(embeddings=False) == num_params(cfg, embeddings=False)


def test_closed_form_matches_textbook_formulas():
    # GPT-2 small: V·d + T·d + L·(12d² + 13d) + 2d (Radford et al. 2019 released weights: 124,439,808).
    c = get_preset("gpt2-124m")
    d, L = c.d_model, c.n_layer
    assert num_params(c) == c.vocab_size * d + c.max_seq_len * d + L * (12 * d * d + 13 * d) + 2 * d == 124_439_808
    # Llama 3 8B: 8,030,261,248 parameters (Meta's released model).
    assert num_params(get_preset("llama3-8b")) == 8_030_261_248
    # Training FLOPs per token: 6·N_matmul + 12·L·T·d for MHA with d_head·n_head = d (Kaplan 2020 / PaLM).
    n_matmul = 12 * L * d * d + c.vocab_size * d
    assert flops_per_token(c, 1024) == 6 * n_matmul + 12 * L * 1024 * d


@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_per_token_equals_counted_matmul_flops(variant):
    """torch's FlopCounterMode over forward+backward (math attention: full T×T square) equals the formula."""
    cfg = replace(get_preset("tiny"), **VARIANTS[variant])
    model = GPT(cfg)
    bsz, seq = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (bsz, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids).sum().backward()
    assert counter.get_total_flops() / (bsz * seq) == flops_per_token(cfg, seq)


def test_meta_build_then_materialize_matches_eager():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    eager = GPT(cfg)
    with torch.device("meta"):
        lazy = GPT(cfg)
    lazy.to_empty(device="cpu")
    lazy.init_buffers("cpu")
    lazy.output.weight = lazy.tok_embeddings.weight
    lazy.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 128, (1, 16))
    torch.testing.assert_close(lazy(ids), eager(ids))


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    cfg = replace(get_preset("shakespeare-char"), n_layer=8)
    model = GPT(cfg)
    wo = model.layers["0"].attention.wo.weight.std().item()
    wq = model.layers["0"].attention.wq.weight.std().item()
    assert wq == pytest.approx(0.02, rel=0.05)
    assert wo == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)


def test_tiny_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(get_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 128, (4, 33))
    x, y = ids[:, :-1], ids[:, 1:]
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05


def test_config_validation_messages():
    with pytest.raises(ValueError, match="n_kv_head=3 must divide model.n_head=4"):
        replace(get_preset("tiny"), n_kv_head=3).validate()
    with pytest.raises(KeyError, match="did you mean 'gpt2-124m'"):
        get_preset("gpt2-124")


def test_gpt_py_runs_copied_out_with_plain_torch(tmp_path):
    """gpt.py needs only PyTorch and the model's own config (and counting, for FLOPs): copied out of the project
    with those two files it builds, trains a step and counts FLOPs, and no other scalelm module is loaded."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import scalelm.model.gpt as gpt_module

    source = Path(gpt_module.__file__).parent
    package = tmp_path / "scalelm" / "model"
    package.mkdir(parents=True)
    (tmp_path / "scalelm" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    for name in ("gpt.py", "config.py", "counting.py"):
        shutil.copy(source / name, package / name)
    code = ("import sys, torch\n"
            "from scalelm.model.config import ModelConfig\n"
            "from scalelm.model.gpt import GPT\n"
            "model = GPT(ModelConfig(vocab_size=32, n_layer=2, n_head=2, d_model=16, max_seq_len=8))\n"
            "model(torch.randint(0, 32, (2, 8))).mean().backward()\n"
            "assert model.flops_per_token(8) > 0\n"
            f"assert sys.modules['scalelm.model.gpt'].__file__.startswith({str(tmp_path)!r})\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('scalelm'))\n"
            "assert loaded == ['scalelm', 'scalelm.model', 'scalelm.model.config', 'scalelm.model.counting', "
            "'scalelm.model.gpt'], loaded\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": ""},
                   check=True)
