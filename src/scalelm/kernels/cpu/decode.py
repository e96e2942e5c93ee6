"""Decode steps on CPU: the linear layers of a one-token step stream their weights at memory speed.

A decode step multiplies a row or a few (one per sequence of the batch) by every weight matrix: two FLOPs per
weight element read, so its speed is the rate at which the weights come from memory. PyTorch hands that product
to its BLAS, whose matrix-vector path on some CPUs (AMD EPYC under MKL among them) reads well below the memory's
rate (docs/benchmarks.md#generation). `csrc/gemv.cpp` is a plain streaming kernel for exactly this shape, written
here because no library PyTorch ships offers one: fp32 and bf16 weights, each output one dot product in a fixed
order (a row's numbers do not depend on its batch or the thread count).

`apply_decode_kernels(model)` swaps `nn.Linear` for `DecodeLinear` (and oneDNN's `OneDNNLinear` for
`OneDNNDecodeLinear`): same parameters and state dict; the forward takes the kernel for up to `MAX_ROWS` rows of
plain CPU fp32/bf16 tensors outside autograd, and the layer's own forward for anything else (prefill, training).
It also moves the weights onto huge pages (`pages.py`). The generation engine applies it to a CPU model of 64 MiB
or more (`scalelm.infer.generate.auto_decode_kernels`); a smaller one's steps are bound by operator dispatch.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from scalelm.kernels.cpu import build
from scalelm.kernels.cpu.linear import OneDNNLinear
from scalelm.kernels.cpu.pages import pack_on_huge_pages

MAX_ROWS = 8
"""Rows the kernel takes at most: past a few, the product has the arithmetic of a GEMM, which BLAS tiles better."""
DTYPES = (torch.float32, torch.bfloat16)
log = logging.getLogger("scalelm.kernels")


@torch.library.custom_op("scalelm::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, K] · weightᵀ (weight [N, K]) + bias → [rows, N], by scalelm's streaming kernel."""
    if not build.available():
        raise RuntimeError("scalelm's CPU kernels are not built on this machine: check use_gemv first")
    return torch.ops.scalelm_cpu_gemv.gemv(x, weight.contiguous(), None if bias is None else bias.contiguous())


@gemv.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@register_flop_formula(torch.ops.scalelm.gemv)
def _flops(x_shape, w_shape, *args, **kwargs) -> int:
    """FlopCounterMode counts this op like the matmul it is."""
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]


_PLAIN = (torch.Tensor, nn.Parameter)


def use_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `gemv` computes F.linear(x, weight, bias) here: a few rows, no gradient, plain CPU operands of one
    dtype (fp32 or bf16), no autocast, and the kernel library built. Checked on every call of a decode step's
    layers, so the cheap tests come first."""
    if x.dim() == 0 or x.shape[-1] == 0 or not 0 < x.numel() <= MAX_ROWS * x.shape[-1]:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    dtype = weight.dtype
    if dtype not in DTYPES or x.dtype != dtype or type(x) not in _PLAIN or type(weight) not in _PLAIN:
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu" or not weight.is_contiguous():
        return False
    if bias is not None and (bias.dtype != dtype or type(bias) not in _PLAIN or bias.device.type != "cpu"):
        return False
    return not torch.is_autocast_enabled("cpu") and build.available()


class DecodeLinear(nn.Linear):
    """`nn.Linear` whose few-row inference forward is `gemv`; same parameters, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_gemv(x, self.weight, self.bias):
            return super().forward(x)
        if torch.compiler.is_compiling():  # the custom op, which torch.compile traces as one opaque call
            return gemv(x.reshape(-1, x.shape[-1]), self.weight, self.bias).view(*x.shape[:-1], -1)
        # The C++ operator itself, on x of any leading shape: a decode step calls it per layer, and the custom
        # op's wrapper and Python-side reshapes cost more than a small product's arithmetic.
        return torch.ops.scalelm_cpu_gemv.gemv(x, self.weight, self.bias)


class OneDNNDecodeLinear(DecodeLinear, OneDNNLinear):
    """`OneDNNLinear` (oneDNN for everything else) with `DecodeLinear`'s few-row forward."""


def apply_decode_kernels(model: nn.Module) -> list[str]:
    """Swap `model`'s linear layers for their `DecodeLinear` versions and move its parameters onto huge pages
    (`pack_on_huge_pages`: the stream the kernel reads), in place; nothing where the parameters are not plain CPU
    tensors (a GPU or tensor-parallel model) or the kernel library cannot be built. Returns what it applied."""
    params = list(model.parameters())
    if not params or any(type(p) is not nn.Parameter or p.device.type != "cpu" for p in params):
        return []
    if not build.available():
        return []
    swaps = {nn.Linear: DecodeLinear, OneDNNLinear: OneDNNDecodeLinear}
    count = 0
    for module in model.modules():
        new_class = swaps.get(type(module))
        if new_class is not None:
            module.__class__ = new_class  # the same object, parameters and hooks: only the forward changes
            count += 1
    if not count:
        return []
    applied = [f"DecodeLinear ×{count}"]
    moved = pack_on_huge_pages(params)
    if moved:
        applied.append(f"weights on huge pages ({moved / 1e6:.0f} MB)")
    log.info("applied decode kernels: %s", ", ".join(applied))
    return applied
