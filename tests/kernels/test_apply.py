"""apply_cpu_kernels: module swaps that change how the model computes, never what, for every model family."""

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import MODEL_VARIANTS as VARIANTS

from scalelm.kernels.cpu import apply_cpu_kernels
from scalelm.model import get_preset
from scalelm.model.gpt import GPT


@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_kernels_compute_the_plain_models_function(variant):
    """q/k/v fused into one matmul, the attention, norm and embedding kernels: the same logits and gradients as
    the plain model, for each model family (learned/sinusoidal positions, LayerNorm, GELU, biases)."""
    torch.manual_seed(0)
    model = GPT(replace(get_preset("tiny"), **VARIANTS[variant]))
    ids = torch.randint(0, 128, (2, 32))
    results = []
    for _ in range(2):
        model.zero_grad()
        logits = model(ids)
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        apply_cpu_kernels(model)
    (plain_logits, plain_grads), (kernel_logits, kernel_grads) = results
    torch.testing.assert_close(kernel_logits, plain_logits, rtol=1e-5, atol=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(kernel_grads[name], plain_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_a_model_on_the_meta_device_is_swapped_like_a_cpu_one():
    """Distributed runs build on meta, swap, then materialize their shards on the CPU."""
    on_meta, on_cpu = GPT(get_preset("tiny")).to("meta"), GPT(get_preset("tiny"))
    assert apply_cpu_kernels(on_meta) == apply_cpu_kernels(on_cpu)
    assert [type(m).__name__ for m in on_meta.modules()] == [type(m).__name__ for m in on_cpu.modules()]


def test_applying_twice_is_applying_once():
    model = GPT(get_preset("tiny"))
    first = apply_cpu_kernels(model)
    assert apply_cpu_kernels(model) == [] or "no C++ kernels (not built)" in first
    assert any(name.startswith("KernelAttention") for name in first)


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch, caplog):
    """A process killed while building leaves PyTorch's lock, which would make every later build wait forever."""
    from scalelm.kernels.cpu import build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory("scalelm_test", verbose=False)) / "lock"
    lock.touch()
    build._remove_stale_lock("scalelm_test")
    assert lock.exists()  # a build may be running right now
    old = time.time() - build.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="scalelm.kernels"):
        build._remove_stale_lock("scalelm_test")
    assert not lock.exists() and "did not finish" in caplog.text
