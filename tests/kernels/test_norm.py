"""RMSNorm with scalelm's CPU weight gradient: nn.RMSNorm's numbers, gradients included, the same bits on any
thread count, kept whole by torch.compile, and nn.RMSNorm itself wherever it does not apply."""

import os
import shutil

import pytest
import torch

from scalelm.kernels.cpu import build
from scalelm.kernels.cpu.norm import KernelRMSNorm

# The kernels build with the machine's C++ compiler (the one torch.compile needs too); where there is one, a failed
# build is a failure here, not a skip.
pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler: scalelm's CPU kernels are not built on this machine")


@pytest.fixture(autouse=True)
def _kernels_built():
    assert build.available(), "scalelm's CPU kernels did not build (see the logged line above)"


def _grads(norm, x, grad):
    x = x.detach().clone().requires_grad_()
    norm.weight.grad = None
    out = norm(x)
    out.backward(grad)
    return out.detach(), x.grad, norm.weight.grad.clone()


@pytest.mark.parametrize("shape", [(4, 37, 24), (1, 1, 8), (600, 16)])  # rows not a multiple of the 256-row chunk
def test_matches_nn_rmsnorm_with_gradients(shape):
    torch.manual_seed(0)
    ours = KernelRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    reference = torch.nn.RMSNorm(shape[-1], eps=1e-5)
    reference.load_state_dict(ours.state_dict())
    x, grad = torch.randn(shape), torch.randn(shape)
    for got, want in zip(_grads(ours, x, grad), _grads(reference, x, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weight_gradient_is_the_same_on_any_thread_count():
    torch.manual_seed(0)
    norm, x, grad = KernelRMSNorm(32, eps=1e-5), torch.randn(3000, 32), torch.randn(3000, 32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_grads(norm, x, grad)[2])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_compiled_norm_keeps_the_weight_gradient_whole():
    torch.manual_seed(0)
    norm, x = KernelRMSNorm(16, eps=1e-5), torch.randn(2, 10, 16)
    explained = torch._dynamo.explain(norm)(x)
    assert explained.graph_break_count == 0
    torch.compile(norm)(x).square().sum().backward()
    compiled = norm.weight.grad.clone()
    norm.weight.grad = None
    norm(x).square().sum().backward()
    torch.testing.assert_close(compiled, norm.weight.grad, rtol=1e-5, atol=1e-6)


def test_other_dtypes_and_frozen_weights_take_nn_rmsnorm():
    norm = KernelRMSNorm(8, eps=1e-5)
    x = torch.randn(2, 8, dtype=torch.float64)
    norm64 = norm.double()
    torch.testing.assert_close(norm64(x), torch.nn.functional.rms_norm(x, (8,), norm64.weight, 1e-5))
    frozen = KernelRMSNorm(8, eps=1e-5).requires_grad_(False)
    assert frozen(torch.randn(2, 8)).grad_fn is None
