"""Count the bytes a rank hands to collectives during a step — measured in the real run, not modelled.

`CommCounter` is a TorchDispatchMode: every c10d / functional-collective op that runs on this thread (FSDP2
all-gathers and reduce-scatters, DTensor all-reduces for TP, pipeline sends, DDP hook all-reduces) adds the
bytes of its *input* tensors — the payload this rank contributes. A ring all-reduce of P bytes puts about
2·(n−1)/n·P on the wire; we report P, the number that compression divides. DDP communication hooks may run
their second half in a gloo worker thread (PowerSGD all-reduces Q from a future callback), where a dispatch mode
is not active, so `torch.distributed.all_reduce` is also wrapped for the duration, with a thread-local flag that
stops the same call from being counted twice on the main thread.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

_inside_wrapper = threading.local()


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    return 0


_COLLECTIVES = ("allreduce", "all_reduce", "allgather", "all_gather", "reduce_scatter", "broadcast", "send",
                "alltoall", "all_to_all", "gather", "scatter", "reduce")


def _payload(name: str, args) -> int:
    """Bytes this rank contributes to collective `name` (c10d or _c10d_functional op); 0 for anything else
    (receives, waits, barriers, autograd wrappers)."""
    if "recv" in name or not any(word in name for word in _COLLECTIVES):
        return 0
    if name.startswith(("_allgather_base", "_reduce_scatter_base")) or name in (
            "allgather_", "reduce_scatter_", "allgather_into_tensor_coalesced_", "reduce_scatter_tensor_coalesced_",
            "alltoall_base_", "alltoall_"):
        return _tensor_bytes(args[1])  # (output, input, ...)
    return _tensor_bytes(args[0])


class CommCounter(TorchDispatchMode):
    """`with CommCounter() as c: step()` → c.bytes (int), c.by_op {op name: bytes}."""

    def __init__(self):
        super().__init__()
        self.by_op: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._real_all_reduce = None

    @property
    def bytes(self) -> int:
        return sum(self.by_op.values())

    def _add(self, name: str, nbytes: int) -> None:
        with self._lock:
            self.by_op[name] += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns in ("c10d", "_c10d_functional", "c10d_functional") and not getattr(_inside_wrapper, "on", False):
            name = func._schema.name.split("::")[-1]
            nbytes = _payload(name, args)
            if nbytes:
                self._add(name, nbytes)
        return func(*args, **kwargs)

    def __enter__(self):
        real = self._real_all_reduce = dist.all_reduce

        def counted_all_reduce(tensor, *args, **kwargs):
            self._add("allreduce_", _tensor_bytes(tensor))
            _inside_wrapper.on = True
            try:
                return real(tensor, *args, **kwargs)
            finally:
                _inside_wrapper.on = False

        dist.all_reduce = counted_all_reduce
        return super().__enter__()

    def __exit__(self, *exc):
        dist.all_reduce = self._real_all_reduce
        return super().__exit__(*exc)
