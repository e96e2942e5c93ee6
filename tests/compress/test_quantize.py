"""Weight-only quantization: exact packing, error bounds of the stored numbers, the quantized modules compute
from them what a dequantized float model computes, and the model really gets smaller."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from scalelm.compress.quantize import (
    Int4Linear,
    Int8Embedding,
    QuantizeError,
    check_options,
    dequantize_int4,
    model_bytes,
    pack_int4,
    quantize_int4_groups,
    quantize_int8_rows,
    quantize_model,
    quantize_tensors,
    unpack_int4,
)
from scalelm.model import get_preset
from scalelm.model.gpt import GPT

VARIANTS = {
    "tied-swiglu": {},
    "untied-gelu-bias": dict(mlp="gelu", pos="learned", norm="layernorm", bias=True, tie_embeddings=False,
                             n_kv_head=None),
}


def _model(variant: str) -> GPT:
    torch.manual_seed(0)
    return GPT(replace(get_preset("tiny"), **VARIANTS[variant])).eval()


def test_int4_packing_round_trips_exactly_and_puts_even_columns_in_the_low_nibble():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert pack_int4(torch.tensor([[3, 12]], dtype=torch.uint8)).item() == 3 + 12 * 16


def test_int8_rows_dequantize_within_half_a_step():
    w = torch.randn(48, 96) * torch.logspace(-3, 0, 48)[:, None]  # rows of very different ranges
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert int(q.abs().max()) <= 128
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-3)).all())  # torchao: scale = absmax / 127.5


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_groups_dequantize_within_half_a_step(group_size):
    w = torch.randn(16, 256)
    w[0, :group_size] = 0.25  # an all-equal group stays exact
    q, scale, zero = quantize_int4_groups(w, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert scale.dtype == zero.dtype == torch.float16 and scale.shape == (16, 256 // group_size)
    deq = dequantize_int4(q, scale, zero)
    step = scale.float().repeat_interleave(group_size, dim=1)
    zero_rounding = zero.float().abs().repeat_interleave(group_size, dim=1) * 2.0**-11
    assert bool(((deq - w).abs() <= step / 2 + zero_rounding + 1e-6).all())
    assert torch.equal(deq[0, :group_size], w[0, :group_size])


def test_int4_linear_computes_the_dequantized_linear():
    torch.manual_seed(0)
    w, bias, x = torch.randn(40, 128), torch.randn(40), torch.randn(3, 5, 128)
    q, scale, zero = quantize_int4_groups(w, 32)
    layer = Int4Linear(pack_int4(q), scale, zero, bias)
    assert layer.weight_packed.numel() == 40 * 128 // 2  # half a byte per weight in memory too
    torch.testing.assert_close(layer(x), F.linear(x, dequantize_int4(q, scale, zero), bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits,group_size,tolerance", [(8, None, 0.02), (4, 32, 0.1)])
def test_quantized_model_stays_close_to_the_dense_one_and_is_smaller(variant, bits, group_size, tolerance):
    model = _model(variant)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        dense = model(ids)
        quantized_model = quantize_model(copy.deepcopy(model), bits, group_size)
        got = quantized_model(ids)
    assert (got - dense).abs().max() < tolerance * dense.abs().max()
    assert model_bytes(quantized_model) < model_bytes(model) / 2
    assert isinstance(quantized_model.tok_embeddings, Int8Embedding)


def test_stored_tensors_take_one_byte_or_half_a_byte_per_weight():
    model = _model("tied-swiglu")
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "output")
    t8, spec8 = quantize_tensors(model, 8)
    t4, spec4 = quantize_tensors(model, 4, 32)
    assert sum(t.numel() for k, t in t8.items() if k.endswith(".qdata")) == linear + model.tok_embeddings.weight.numel()
    assert sum(t.numel() for k, t in t4.items() if k.endswith(".packed")) == linear // 2
    assert sum(t.numel() for k, t in t4.items() if k.endswith((".scale", ".zero")) and "tok" not in k) == linear // 16
    assert spec4["modules"]["output"] == {"kind": "int8-tied-head"} and spec8["bits"] == 8


def test_options_are_checked():
    with pytest.raises(QuantizeError, match="--bits 3"):
        check_options(3, None)
    with pytest.raises(QuantizeError, match="--group-size 48"):
        check_options(4, 48)
    assert check_options(4, None) == 32 and check_options(8, None) is None
    with pytest.raises(QuantizeError, match="not a multiple of --group-size 64"):  # tiny's d_model is 32
        quantize_tensors(_model("tied-swiglu"), 4, 64)
