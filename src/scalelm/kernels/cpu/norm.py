"""RMSNorm whose weight gradient on CPU is scalelm's own pass (`csrc/rms_norm.cpp`) rather than torch.compile's.

Compiled, the norm's backward is one kernel that also sums dy · x̂ over the tokens for the weight, walking the
[tokens, d] tensors in narrow column strips, which is slow on a CPU; a separate pass that streams the rows is
faster. So on plain fp32 CPU tensors `KernelRMSNorm` is an autograd function whose input gradient stays PyTorch
code (torch.compile fuses it with the residual adds around it) and whose weight gradient is a custom op it keeps
whole. Elsewhere (other dtypes, DTensors) it is nn.RMSNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from scalelm.kernels.cpu import build
from scalelm.kernels.cpu.linear import plain_fp32_cpu


@torch.library.custom_op("scalelm::rms_norm_weight_grad", mutates_args=())
def rms_norm_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of grad_out · x · rstd: the weight gradient of RMSNorm for x [..., d], rstd [..., 1]."""
    return torch.ops.scalelm_cpu_norm.rms_norm_weight_grad(grad_out, x, rstd)


@rms_norm_weight_grad.register_fake
def _(grad_out, x, rstd):
    return x.new_empty(x.shape[-1])


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return x * rstd * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd
        g = grad * weight
        grad_x = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        grad_w = rms_norm_weight_grad(grad.contiguous(), x.contiguous(), rstd.contiguous())
        return grad_x, grad_w, None


class KernelRMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` over the last dimension, with scalelm's weight gradient on plain fp32 CPU tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (len(self.normalized_shape) == 1 and self.weight is not None and self.eps is not None
                and plain_fp32_cpu(x) and plain_fp32_cpu(self.weight) and self.weight.requires_grad
                and build.available()):
            return _RMSNorm.apply(x, self.weight, self.eps)
        return super().forward(x)
