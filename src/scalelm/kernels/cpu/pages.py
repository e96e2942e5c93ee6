"""The weights a decode step streams, moved onto transparent huge pages.

A one-token decode step reads every weight matrix once, front to back. On 4 KiB pages that stream takes a TLB miss
every 4 KiB, and under virtualization each miss walks two page tables, so the weights arrive well below the
memory's rate (docs/benchmarks.md#generation). Linux backs a region advised `MADV_HUGEPAGE` with 2 MiB pages where
its `transparent_hugepage` setting is "always" or "madvise"; PyTorch's allocator advises only when the process was
started with `THP_MEM_ALLOC_ENABLE=1`, too late to set once a model is loaded. So `pack_on_huge_pages` copies the
tensors into one fresh anonymous mapping, advised before its pages are first touched, in the order given (a
forward's order: one long stream), and points the parameters at their copies. Same values, dtypes, shapes and
Parameter objects; the state dict saves as before (non-overlapping views of one buffer).
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 * 2**20
ALIGN = 64  # bytes: each tensor starts on a cache line, as PyTorch's allocator places them
log = logging.getLogger("scalelm.kernels")


def huge_pages_possible() -> bool:
    """Whether this kernel hands out transparent huge pages to a region that asks for them."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in setting


def pack_on_huge_pages(params: Sequence[nn.Parameter]) -> int:
    """Move `params` (CPU tensors, each once) into one buffer on transparent huge pages, in this order. Returns
    the bytes moved; 0 where the machine offers no huge pages or there is nothing to move."""
    params = [p for p in dict.fromkeys(params) if p.device.type == "cpu" and p.numel()]
    if not params or not huge_pages_possible():
        return 0
    offsets, end = [], 0
    for p in params:
        offsets.append(end)
        end += -(-p.numel() * p.element_size() // ALIGN) * ALIGN
    # Private and anonymous: zero-filled, not yet touched (a shared mapping would be shmem, whose huge pages
    # follow another setting that is usually off).
    try:
        mapping = mmap.mmap(-1, end + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError as e:  # no room for a second copy (a ulimit), or a sandbox that refuses the advice
        log.info("weights left on their pages: %s", e)
        return 0
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive as long as a view of it lives
    start = -raw.data_ptr() % HUGE_PAGE  # the first byte on a 2 MiB boundary: whole huge pages from there
    with torch.no_grad():
        for p, offset in zip(params, offsets):
            nbytes = p.numel() * p.element_size()
            home = raw[start + offset:start + offset + nbytes].view(p.dtype).view(p.shape)
            home.copy_(p)
            p.data = home
    log.info("moved %.0f MB of weights onto transparent huge pages", end / 1e6)
    return end
