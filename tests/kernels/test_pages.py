"""Weights moved onto huge pages: the same values, Parameter objects and ties, and a state dict that saves and
loads as before."""

import errno
import mmap

import pytest
import torch
from safetensors.torch import load_file, save_file

from scalelm.kernels.cpu import pages
from scalelm.kernels.cpu.pages import HUGE_PAGE, huge_pages_possible, pack_on_huge_pages
from scalelm.model import get_preset
from scalelm.model.gpt import GPT
from scalelm.train.checkpoint import unique_state


def test_packing_keeps_values_parameters_and_ties(tmp_path):
    torch.manual_seed(0)
    model = GPT(get_preset("tiny")).eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = list(model.parameters())
    ids = torch.randint(0, 128, (2, 5))
    with torch.inference_mode():
        want = model(ids)
    moved = pack_on_huge_pages(params)
    if not huge_pages_possible():
        assert moved == 0
        return
    assert moved >= sum(p.numel() * p.element_size() for p in params)
    assert list(model.parameters()) == params  # the same objects, now views of one buffer
    assert model.output.weight is model.tok_embeddings.weight  # the tie survives
    first = params[0].data_ptr() - params[0].untyped_storage().data_ptr()
    assert (params[0].untyped_storage().data_ptr() + first) % HUGE_PAGE == 0  # the buffer's huge pages start here
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
        assert p.untyped_storage().data_ptr() == params[0].untyped_storage().data_ptr()  # all in the one buffer
    with torch.inference_mode():
        assert torch.equal(model(ids), want)
    save_file(unique_state(model), str(tmp_path / "model.safetensors"))
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[name], before[name]) for name in loaded)


def _vm_flags(address: int) -> list[str]:
    """The kernel's flags of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                start, end = (int(a, 16) for a in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "VmFlags:":
                return fields[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_the_buffer_is_private_memory_advised_for_huge_pages():
    """madvise on a shared anonymous mapping would be shmem's, whose huge pages are usually off: the buffer is
    private ("hg": advised for huge pages; no "sh": not shared)."""
    weight = torch.nn.Parameter(torch.randn(1024, 1024), requires_grad=False)
    if not pack_on_huge_pages([weight]):
        assert not huge_pages_possible()
        return
    flags = _vm_flags(weight.data_ptr())
    assert "hg" in flags and "sh" not in flags


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no transparent huge pages on this platform")
def test_a_refused_advice_leaves_the_weights_where_they_are(monkeypatch):
    class RefusingMapping(mmap.mmap):
        def madvise(self, *args):
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(mmap, "mmap", RefusingMapping)
    monkeypatch.setattr(pages, "huge_pages_possible", lambda: True)
    weight = torch.nn.Parameter(torch.randn(64, 64), requires_grad=False)
    before, address = weight.detach().clone(), weight.data_ptr()
    assert pack_on_huge_pages([weight]) == 0
    assert weight.data_ptr() == address and torch.equal(weight, before)


def test_nothing_to_pack_moves_nothing():
    assert pack_on_huge_pages([]) == 0
