"""fp32 linear layers on CPU through oneDNN, where its GEMM is faster than the BLAS one.

PyTorch runs a CPU fp32 matmul through its BLAS (MKL on x86 wheels). On the AMD EPYC this project is developed on,
MKL's sgemm reaches 143–183 GFLOP/s on 2 cores, while oneDNN, which PyTorch ships as `mkldnn`, reaches 192–212 on
the same square matmul and is also faster on the model's [tokens × d] · [d × 3d] and [tokens × 3d] · [3d × d]
shapes; the shakespeare-char fp32 training step is 6–19% faster with it, depending on how fast MKL happens to run
on the shared machine (bench/step_ab.py --compare cpu-matmul; docs/benchmarks.md).
PyTorch has no switch for this (its oneDNN matmul path is only taken for bf16 or reduced-precision fp32), so
`linear` calls oneDNN's linear kernel directly, registered as a custom op so that torch.compile keeps it as one
opaque call. Only the forward and the input gradient go to oneDNN: the weight gradient, a reduction over all the
tokens, stays on BLAS, which is faster for that shape here.

The backend is a process-wide choice, like `torch.backends` flags: `set_cpu_matmul("onednn" | "blas")`. It is "blas"
(plain PyTorch) until a caller chooses; the trainer chooses per `train.cpu_matmul`. Anything that is not a plain
fp32 CPU tensor (CUDA, DTensor under tensor parallelism, bf16 autocast) takes `F.linear` whatever the choice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

BACKENDS = ("blas", "onednn")
_backend = "blas"


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def set_cpu_matmul(backend: str) -> None:
    """Route plain fp32 CPU linear layers through `backend` ("blas" = PyTorch's default, "onednn")."""
    global _backend
    if backend not in BACKENDS:
        raise ValueError(f"cpu matmul backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "onednn" and not onednn_available():
        raise ValueError("this PyTorch build has no oneDNN (mkldnn); use the blas backend")
    _backend = backend


def cpu_matmul() -> str:
    return _backend


@contextmanager
def cpu_matmul_backend(backend: str) -> Iterator[None]:
    """`set_cpu_matmul(backend)` for the duration of a block (a training run), then the previous choice again."""
    before = _backend
    set_cpu_matmul(backend)
    try:
        yield
    finally:
        set_cpu_matmul(before)


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
    """None, or an fp32 CPU tensor that is not a tensor subclass (DTensor): what scalelm's CPU paths take."""
    return t is None or (type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu"
                         and t.dtype == torch.float32)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN when that backend is chosen and the operands are plain fp32 CPU tensors."""
    if (_backend == "onednn" and plain_fp32_cpu(x) and plain_fp32_cpu(weight) and plain_fp32_cpu(bias) and x.numel() > 0
            and not torch.is_autocast_enabled("cpu")):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` whose forward is `linear` (tensor parallelism and FSDP see an ordinary nn.Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
