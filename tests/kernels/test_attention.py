"""scalelm's fp32 CPU attention kernel: the numbers of RoPE + scaled_dot_product_attention (gradients included),
bit-for-bit the same on any thread count, inside torch.compile without graph breaks, and only where it applies."""

import logging
import math
import os
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from scalelm.kernels.cpu import apply_cpu_kernels, build
from scalelm.kernels.cpu import attention as ca
from scalelm.model import get_preset
from scalelm.model.gpt import GPT, apply_rope, rope_tables

# The kernels build with the machine's C++ compiler (the one torch.compile needs too); where there is one, a failed
# build is a failure here, not a skip.
pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler: scalelm's CPU kernels are not built on this machine")


@pytest.fixture(autouse=True)
def _kernels_built():
    assert build.available(), "scalelm's CPU kernels did not build (see the logged line above)"


def _reference(qkv: torch.Tensor, heads: int, rope) -> torch.Tensor:
    """The model's other path, in float64: split, rotate, repeat grouped heads, SDPA."""
    kv = (qkv.shape[2] - heads) // 2
    q, k, v = (t.transpose(1, 2) for t in qkv.split((heads, kv, kv), dim=2))
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k, v = k.repeat_interleave(heads // kv, dim=1), v.repeat_interleave(heads // kv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _run(fn, qkv: torch.Tensor, grad: torch.Tensor):
    qkv = qkv.detach().clone().requires_grad_()
    out = fn(qkv)
    out.backward(grad.to(out.dtype))
    return out.detach(), qkv.grad


@pytest.mark.parametrize("batch,seq,heads,kv,dim,rope", [
    (2, 256, 4, 4, 64, True),    # the shakespeare-char shape, 4 query blocks
    (3, 37, 4, 2, 16, True),     # grouped-query heads, a sequence that is not a multiple of the block
    (1, 70, 2, 1, 8, False),     # no RoPE (learned or sinusoidal positions)
    (2, 1, 2, 2, 4, True),       # one position
])
def test_kernel_matches_rope_and_sdpa_with_gradients(batch, seq, heads, kv, dim, rope):
    torch.manual_seed(0)
    qkv = torch.randn(batch, seq, heads + 2 * kv, dim)
    grad = torch.randn(batch, seq, heads, dim).transpose(1, 2)
    tables = tuple(t[:seq] for t in rope_tables(dim, seq, 10000.0)) if rope else None
    got = _run(lambda x: ca.attention(x, heads, tables), qkv, grad)
    want = _run(lambda x: _reference(x, heads, tuple(t.double() for t in tables) if tables else None),
                qkv.double(), grad.double())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=2e-6)


def test_results_do_not_depend_on_the_thread_count():
    """Each (batch, head) pair is one thread's work with the same BLAS calls: a resumed run on another thread
    count computes the same bits."""
    torch.manual_seed(0)
    qkv = torch.randn(4, 100, 6, 32)
    grad = torch.randn(4, 100, 2, 32).transpose(1, 2)
    tables = tuple(t[:100] for t in rope_tables(32, 100, 10000.0))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run(lambda x: ca.attention(x, 2, tables), qkv, grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_output_is_laid_out_for_merging_heads():
    qkv = torch.randn(2, 16, 12, 8)
    out = ca.attention(qkv, 4, None)
    assert out.shape == (2, 4, 16, 8)
    assert out.transpose(1, 2).is_contiguous()  # [B, T, H, D] in memory: reshape to [B, T, H·D] is a view


def test_model_with_kernels_applied_matches_the_plain_model():
    """apply_cpu_kernels changes how, not what: the same logits and gradients as the plain model (SDPA, three
    projections), under the same parameter names."""
    torch.manual_seed(0)
    model = GPT(get_preset("tiny"))  # grouped-query heads, RoPE
    ids = torch.randint(0, 128, (3, 40))
    results = []
    for _ in range(2):
        model.zero_grad()
        logits = model(ids)
        logits.square().mean().backward()
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
        names = list(model.state_dict())
        apply_cpu_kernels(model)
    assert type(model.layers["0"].attention) is ca.KernelAttention and list(model.state_dict()) == names
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_where_the_kernel_applies():
    x = torch.randn(2, 8, 6, 4)
    assert ca.use_kernel(x, 4, 1, 0.0)
    assert not ca.use_kernel(x, 4, 1, 0.1)                              # dropout: SDPA
    assert not ca.use_kernel(x.bfloat16(), 4, 1, 0.0)                   # bf16: SDPA's flash kernel
    assert not ca.use_kernel(x, 4, 3, 0.0)                              # heads not a multiple of kv heads
    assert not ca.use_kernel(torch.randn(1, ca.MAX_SEQ + 1, 3, 4), 1, 1, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ca.use_kernel(x, 4, 1, 0.0)


def test_a_failed_build_falls_back_to_pytorch_with_one_log_line(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="scalelm.kernels"):
        assert not build.available()
        assert not build.available()  # decided once: no second line
        assert not ca.use_kernel(torch.randn(1, 4, 3, 2), 1, 1, 0.0)
        model = GPT(get_preset("tiny"))
        applied = apply_cpu_kernels(model)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0].getMessage()
    assert "no C++ kernels (not built)" in applied and not any("KernelRMSNorm" in a for a in applied)
    model(torch.randint(0, 128, (1, 8))).sum().backward()  # the plain operators run


def test_compiled_model_keeps_the_kernel_whole():
    torch.manual_seed(0)
    cfg = replace(get_preset("tiny"), max_seq_len=32)
    model = GPT(cfg)
    apply_cpu_kernels(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0
    ops = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    assert "scalelm.cpu_attention_fwd.default" in ops
    torch.testing.assert_close(torch.compile(model)(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_scale_is_one_over_sqrt_head_dim():
    """Sanity of the convention against a direct softmax on one head."""
    torch.manual_seed(0)
    qkv = torch.randn(1, 5, 3, 8)
    q, k, v = qkv[0, :, 0], qkv[0, :, 1], qkv[0, :, 2]
    scores = (q @ k.T) / math.sqrt(8) + torch.full((5, 5), float("-inf")).triu(1)
    want = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(ca.attention(qkv, 1, None)[0, 0], want, rtol=1e-5, atol=1e-6)


def test_broadcast_operands_and_gradients_are_read_as_copies():
    """BLAS needs rows at least D apart: an input expanded over positions, or the gradient of a sum over positions
    (stride 0), goes in as a contiguous copy instead of as garbage leading dimensions."""
    torch.manual_seed(0)
    base = torch.randn(2, 1, 6, 8)
    got = _run(lambda x: ca.attention(x.expand(2, 16, 6, 8), 2, None).sum(2), base, torch.ones(2, 2, 8))
    want = _run(lambda x: _reference(x.expand(2, 16, 6, 8), 2, None).sum(2), base.double(), torch.ones(2, 2, 8))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-5)
