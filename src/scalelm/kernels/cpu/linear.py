"""fp32 linear layers on CPU through oneDNN, where its GEMM is faster than PyTorch's BLAS one.

PyTorch runs a CPU fp32 matmul through its BLAS (MKL on x86 wheels) and offers no switch to oneDNN, which it ships
as `mkldnn` and which is faster on some CPUs (AMD EPYC among them; docs/benchmarks.md#training-throughput-and-cpu-kernels). So
`OneDNNLinear` calls oneDNN's linear kernel directly, registered as a custom op that torch.compile keeps as one
opaque call. Only the forward and the input gradient go to oneDNN: the weight gradient, a reduction over all the
tokens, stays on BLAS, which is faster for that shape. `apply_cpu_kernels(model, matmul="onednn")` swaps it in;
anything but plain fp32 CPU operands outside autocast takes `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("scalelm::onednn_mm_nt", mutates_args=())
def onednn_mm_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] · bᵀ (b [N, K]) + bias, by oneDNN's fp32 inner-product kernel."""
    return torch.ops.mkldnn._linear_pointwise(a.contiguous(), b.contiguous(), bias, "none", [], "")


@onednn_mm_nt.register_fake
def _(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[0])


@register_flop_formula(torch.ops.scalelm.onednn_mm_nt)
def _flops(a_shape, b_shape, *args, **kwargs) -> int:
    """FlopCounterMode counts this op like the matmul it is."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[0]


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = onednn_mm_nt(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_mm_nt(grad2d, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad2d.t() @ x.reshape(-1, x.shape[-1])  # BLAS: faster than oneDNN for a long reduction
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2d.sum(0)
        return grad_x, grad_w, grad_b


def plain_fp32_cpu(t: torch.Tensor | None) -> bool:
    """None, or an fp32 CPU tensor that is not a tensor subclass (DTensor): what scalelm's CPU kernels take."""
    return t is None or (type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu"
                         and t.dtype == torch.float32)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN where the operands are plain fp32 CPU tensors outside autocast."""
    if (plain_fp32_cpu(x) and plain_fp32_cpu(weight) and plain_fp32_cpu(bias) and x.numel() > 0
            and not torch.is_autocast_enabled("cpu")):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """`nn.Linear` whose fp32 CPU forward is `onednn_linear`; same parameters, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)
