"""The fp32 oneDNN path of the linear layers: same numbers as F.linear, gradients included, and only where it
applies."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from scalelm.kernels.cpu.linear import OneDNNLinear, onednn_available, onednn_linear

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")


def _grads(fn, x, w, b):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = fn(x, w, b)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), x.grad, w.grad, b.grad


def test_onednn_linear_matches_f_linear_with_gradients():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 17, 24), torch.randn(40, 24), torch.randn(40)
    got = _grads(onednn_linear, x, w, b)
    want = _grads(F.linear, x, w, b)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_autocast_and_other_dtypes_take_pytorchs_own_matmul():
    layer = OneDNNLinear(8, 4)
    x = torch.randn(2, 8)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        assert layer.double()(x.double()).dtype == torch.float64
    assert counter.get_flop_counts()["Global"].get(torch.ops.scalelm.onednn_mm_nt, 0) == 0


def test_flop_counter_counts_the_onednn_matmul():
    layer = OneDNNLinear(16, 8, bias=False)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(4, 16))
    assert counter.get_total_flops() == 2 * 4 * 16 * 8


def test_compiled_model_runs_the_onednn_path_and_matches():
    from scalelm.kernels.cpu import apply_cpu_kernels
    from scalelm.model import get_preset
    from scalelm.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(get_preset("tiny"))
    ids = torch.randint(0, 128, (2, 16))
    want = model(ids)
    apply_cpu_kernels(model, matmul="onednn", kernels=False)
    assert type(model.output).__name__ == "OneDNNLinear"
    with FlopCounterMode(display=False) as counter:
        got = torch.compile(model)(ids)
    assert counter.get_flop_counts()["Global"].get(torch.ops.scalelm.onednn_mm_nt, 0) > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
