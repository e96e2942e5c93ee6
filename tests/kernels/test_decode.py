"""The few-row linear kernel of decode steps: F.linear's numbers in fp32 and bf16, each row's result the same
whatever else is in its batch, and the layer's own forward wherever the kernel does not apply."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from scalelm.kernels.cpu import build
from scalelm.kernels.cpu.decode import MAX_ROWS, DecodeLinear, apply_decode_kernels, gemv
from scalelm.model import get_preset
from scalelm.model.gpt import GPT

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler: scalelm's CPU kernels are not built on this machine")


@pytest.fixture(autouse=True)
def _kernels_built():
    assert build.available(), "scalelm's CPU kernels did not build (see the logged line above)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out,inner", [(1, 5, 3), (1, 65, 256), (3, 200, 77), (MAX_ROWS, 130, 768)])
def test_gemv_computes_f_linear(dtype, rows, out, inner):
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, inner).to(dtype), torch.randn(out, inner).to(dtype), torch.randn(out).to(dtype)
    tol = 1e-5 * inner ** 0.5 if dtype == torch.float32 else 1e-2 * inner ** 0.5
    for bias in (b, None):
        got = gemv(x, w, bias)
        assert got.dtype == dtype and got.shape == (rows, out)
        torch.testing.assert_close(got.float(), F.linear(x, w, bias).float(), rtol=1e-2, atol=tol)


@pytest.mark.parametrize("dtype,inner", [(torch.float32, 300), (torch.bfloat16, 768), (torch.bfloat16, 300)])
def test_a_rows_result_does_not_depend_on_its_batch_or_the_threads(dtype, inner):
    torch.manual_seed(0)
    x, w = torch.randn(6, inner).to(dtype), torch.randn(2001, inner).to(dtype)
    batch = gemv(x, w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [gemv(x[i:i + 1], w) for i in range(6)]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(batch[i:i + 1], alone[i]) for i in range(6))


class _Ops(TorchDispatchMode):
    """Records the operators a block calls."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_decode_linear_takes_the_kernel_only_for_few_rows_without_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    apply_decode_kernels(layer)
    assert type(layer) is DecodeLinear
    x = torch.randn(1, MAX_ROWS + 1, 16)
    with torch.inference_mode():
        with _Ops() as short:
            few = layer(x[:, :2])
        with _Ops() as long:
            many = layer(x)
    with _Ops() as trained:
        out = layer(x[:, :1])  # autograd needs the weight gradient: the plain forward
    assert "scalelm_cpu_gemv.gemv" in short.ops
    assert "scalelm_cpu_gemv.gemv" not in long.ops and "scalelm_cpu_gemv.gemv" not in trained.ops
    torch.testing.assert_close(few, many[:, :2], rtol=0, atol=1e-6)
    assert out.requires_grad and few.shape == (1, 2, 8)


def test_a_model_with_decode_kernels_computes_the_plain_models_logits():
    torch.manual_seed(0)
    model = GPT(get_preset("tiny")).eval()
    ids = torch.randint(0, 128, (3, 1))
    with torch.inference_mode():
        want = model(ids)
        assert apply_decode_kernels(model)
        got = model(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert isinstance(model.output, DecodeLinear)
    assert set(model.state_dict()) == set(GPT(get_preset("tiny")).state_dict())
