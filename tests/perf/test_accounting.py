"""Framework memory accounting: Megatron-LM's theoretical footprint and DeepSpeed's ZeRO model states."""

import pytest

from scalelm.model.config import ModelConfig
from scalelm.perf.accounting import MB, megatron_memory, zero_states
from scalelm.perf.frameworks import PROFILES
from scalelm.perf.hardware import load_hardware
from scalelm.perf.layout import Layout
from scalelm.perf.memory import zero_model_state_bytes
from scalelm.perf.step import predict_memory


def gpt(layers, h, heads, vocab, seq=2048, ffn=None):
    return ModelConfig(vocab_size=vocab, n_layer=layers, n_head=heads, d_model=h, d_ff=ffn or 4 * h, mlp="gelu",
                       norm="layernorm", pos="sinusoidal", bias=False, tie_embeddings=True, max_seq_len=seq)


def llama(layers, h, heads, kv, ffn, seq=8192):
    return ModelConfig(vocab_size=128256, n_layer=layers, n_head=heads, n_kv_head=kv, d_model=h, d_ff=ffn,
                       mlp="swiglu", norm="rmsnorm", pos="rope", bias=False, tie_embeddings=False, max_seq_len=seq)


LLAMA3_8B, LLAMA3_70B = llama(32, 4096, 32, 8, 14336), llama(80, 8192, 64, 8, 28672, 4096)
GPT3_175B = gpt(96, 12288, 96, 51200)


@pytest.mark.parametrize(("cfg", "layout", "shard_b", "mb"), [
    # Start-up lines Megatron-LM printed for these runs ("Number of parameters in most loaded shard in billions",
    # "Theoretical memory footprints: weight and optimizer=... MB"), from public training logs:
    (LLAMA3_8B, dict(dp=8, distributed_optimizer=True), 8.0305, 57438.81),  # Llama 3 8B, tp1 pp1, 8-way DO
    (gpt(48, 1600, 25, 50304, 1024), {}, 1.5554, 26699.47),                # GPT-2 XL, no distributed optimizer
    (gpt(12, 768, 12, 50304, 1024), {}, 0.1236, 2121.85),                   # GPT-2 124M, no distributed optimizer
])
def test_megatron_weight_and_optimizer_match_its_printed_numbers(cfg, layout, shard_b, mb):
    got = megatron_memory(cfg, **layout)
    assert got.shard_params / 1e9 == pytest.approx(shard_b, abs=5e-5)
    assert got.weight_and_optimizer / MB == pytest.approx(mb, abs=0.01)
    assert got.activations is not None  # sequence parallel + selective recompute by default


@pytest.mark.parametrize(("cfg", "layout", "act_mb"), [
    # Megatron's activation arithmetic written out (SP + selective): per layer s·b·h·(18 + 4·ffn/h), all L layers,
    # + (8·s·b + s·b·h)·pp for the embedding, x interleaving penalty or min(1, m/pp), + 4·s·b·h·(1 + V/h) when pp = 1,
    # all over tp. GPT-3 175B at tp8 pp16, s 2048, b 1: (2048·12288·34·96 + 8·2048·16 + 2048·12288·16) / 8 bytes.
    (GPT3_175B, dict(tp=8, pp=16, microbatches=96), 9840.03125),
    (GPT3_175B, dict(tp=8, pp=16, vpp=3), 12915.041015625),            # x (1 + 15/48)
    (GPT3_175B, dict(tp=8, pp=16, microbatches=4), 2460.0078125),     # x 4/16: fewer micro-batches than stages
    (LLAMA3_8B, dict(tp=2, pp=1), 18468.03125),                       # + output layer and fp32 logits
    (llama(80, 8192, 64, 8, 28672, 4096), dict(tp=8, pp=4, vpp=5, micro_batch=2), 23588.8359375),
])
def test_megatron_activation_arithmetic(cfg, layout, act_mb):
    assert megatron_memory(cfg, **layout).activations / MB == pytest.approx(act_mb, rel=1e-9)


def test_megatron_gives_no_activations_outside_sp_and_selective():
    assert megatron_memory(GPT3_175B, tp=8, pp=16, recompute="full").activations is None
    assert megatron_memory(GPT3_175B, tp=8, pp=16, sequence_parallel=False).total is None


@pytest.mark.parametrize(("cfg", "tp", "pp", "dp", "zero"), [
    (LLAMA3_8B, 1, 1, 8, 1), (LLAMA3_8B, 1, 1, 8, 0), (LLAMA3_70B, 8, 4, 4, 1), (LLAMA3_70B, 8, 4, 4, 0),
    (GPT3_175B, 8, 16, 8, 1), (GPT3_175B, 8, 16, 8, 0), (gpt(48, 1600, 25, 50304, 1024), 1, 1, 1, 0),
])
def test_planner_states_for_megatron_equal_megatron_accounting(cfg, tp, pp, dp, zero):
    """The step model's weights + gradients + optimizer for the megatron profile are Megatron's own 18 bytes per
    parameter (6 + 12/dp with the distributed optimizer), on the same most loaded shard, within 2%."""
    lo = Layout(tp=tp, pp=pp, dp=dp, zero=zero, sequence_parallel=tp > 1, recompute="selective")
    mem = predict_memory(cfg, load_hardware("h100-sxm-80gb"), lo, PROFILES["megatron"], cfg.max_seq_len, 8)
    ours = mem.params + mem.grads + mem.optimizer
    theirs = megatron_memory(cfg, tp, pp, dp, distributed_optimizer=zero == 1).weight_and_optimizer
    assert ours == pytest.approx(theirs, rel=0.02)


def test_zero_paper_figure_1():
    """Rajbhandari et al. 2020, Fig. 1: Ψ = 7.5B, N_d = 64, K = 12 -> 120, 31.4, 16.6 and 1.9 GB per device."""
    psi = 7.5e9
    got = [zero_states(psi, stage, 64)["total"] for stage in range(4)]
    assert got == [120e9, 30e9 + 12 * psi / 64, 15e9 + 14 * psi / 64, 16 * psi / 64]
    assert [round(g / 1e9, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]
    with pytest.raises(ValueError, match="stage 4"):
        zero_states(psi, 4, 64)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_step_model_states_are_the_zero_formulas(stage):
    ours = zero_model_state_bytes(1e9, stage, 16, k=12, grad_bytes=2)
    theirs = zero_states(1e9, stage, 16)
    assert (ours["params"], ours["grads"], ours["optimizer"]) == (theirs["params"], theirs["grads"],
                                                                  theirs["optimizer"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_profile_states_are_the_zero_paper_formulas(stage):
    cfg = gpt(24, 2048, 16, 50304)
    mem = predict_memory(cfg, load_hardware("a100-80gb"), Layout(dp=16, zero=stage), PROFILES["deepspeed"], 2048, 1)
    psi = mem.params / 2 * (16 if stage == 3 else 1)
    want = zero_states(psi, stage, 16)
    assert (mem.params, mem.grads, mem.optimizer) == pytest.approx((want["params"], want["grads"], want["optimizer"]))


def test_megatron_fp16_keeps_gradients_in_fp16():
    """Megatron forces fp32 gradient accumulation only for bf16: an fp16 run holds 2 + 2 + 12 bytes per parameter."""
    cfg, hw, fw = GPT3_175B, load_hardware("a100-80gb"), PROFILES["megatron-2021"]
    lo = Layout(tp=8, pp=16, dp=1, recompute="full", sequence_parallel=True)
    fp16 = predict_memory(cfg, hw, Layout(**{**lo.to_dict(), "precision": "fp16"}), fw, 2048, 1)
    bf16 = predict_memory(cfg, hw, lo, fw, 2048, 1)
    assert fp16.grads * 2 == pytest.approx(bf16.grads) and fp16.params == bf16.params
