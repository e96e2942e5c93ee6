"""Hangs made visible: a rank that stops answering ends the run with one line naming it, not a silent wait.

Three parts. Collectives time out after `parallel.timeout_s` (the process group's timeout, see init_distributed).
Every rank's heartbeat thread writes the time into the rendezvous store every few seconds, so when a collective
fails the rank that reports it can say which peers went quiet (stopped, killed, deadlocked) and which are alive
(then the ranks disagree on the order of collectives: a layout mismatch). And `kill -USR1 PID` prints every
thread's Python stack of that rank to stderr (faulthandler), for a look inside a run that seems stuck.
"""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

HEARTBEAT_S = 2.0
"""Seconds between heartbeats (at most; a tenth of the collective timeout if that is shorter); a peer silent for
three of them counts as stopped."""
_STORE_TIMEOUT_S = 5.0


class CollectiveTimeout(RuntimeError):
    """A collective that timed out or lost its peer, phrased for people: which rank, which operation, why."""


def install_stack_dump() -> None:
    """`kill -USR1 PID` dumps every thread's Python stack to stderr and the process carries on."""
    stderr = sys.__stderr__  # the process's own stderr, also when a caller (pytest) replaced sys.stderr
    if not hasattr(signal, "SIGUSR1") or stderr is None:
        return
    try:
        faulthandler.register(signal.SIGUSR1, file=stderr, all_threads=True)
    except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor: nowhere to dump to
        pass


def _store() -> dist.Store | None:
    """A client of the rendezvous store (torchrun's, or rank 0's with env://) with a short timeout of its own, so
    asking about a stopped peer never hangs; keys are per restart of an elastic launch."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        client = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=_STORE_TIMEOUT_S),
                               wait_for_workers=False)
    except (RuntimeError, ValueError):
        return None
    return dist.PrefixStore(f"scalelm/heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


class Heartbeat:
    """A daemon thread that writes this rank's wall time into the store every interval_s seconds."""

    def __init__(self, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size = rank, world_size
        self.interval_s = min(HEARTBEAT_S, timeout_s / 10)
        self.store = _store()
        self._stop = threading.Event()
        if self.store is not None:
            self._beat()
            threading.Thread(target=self._run, name="scalelm-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        try:
            self.store.set(str(self.rank), repr(time.time()))
        except (RuntimeError, ValueError):  # the store went away (the launch is ending): nothing to report to
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()

    def stop(self) -> None:
        self._stop.set()

    def silent_peers(self) -> dict[int, float | None]:
        """{rank: seconds since its last heartbeat (None: never heard)} of the peers that went quiet."""
        if self.store is None:
            return {}
        quiet: dict[int, float | None] = {}
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            try:
                last = float(self.store.get(str(peer)).decode()) if self.store.check([str(peer)]) else None
            except (RuntimeError, ValueError):
                return {}
            age = None if last is None else time.time() - last
            if age is None or age > 3 * self.interval_s:
                quiet[peer] = age
        return quiet


def is_peer_failure(error: BaseException) -> bool:
    """A collective's error that means a peer is gone or silent (gloo's and NCCL's wording)."""
    text = str(error).lower()
    return any(k in text for k in ("timed out", "timeout", "connection closed by peer", "connection reset",
                                   "broken pipe", "watchdog caught collective operation"))


def explain(error: BaseException, rank: int, timeout_s: float, heartbeat: Heartbeat | None) -> CollectiveTimeout:
    """One line: this rank, the operation, the peers that went quiet, the likely cause and what to do."""
    text = " ".join(str(error).split())
    op = re.search(r"for (\w+) operation|OpType=(\w+)", text)
    operation = next(g for g in op.groups() if g) if op else "a collective"
    kind = "timed out after " + f"{timeout_s:g} s" if "time" in text.lower() else "lost its connection"
    quiet = heartbeat.silent_peers() if heartbeat is not None else {}
    if quiet:
        who = ", ".join(f"rank {r} ({'never heard from' if age is None else f'silent for {age:.0f} s'})"
                        for r, age in sorted(quiet.items()))
        cause = f"{who} stopped answering: it died, was stopped or hangs; `kill -USR1` its PID for its stack"
    else:
        cause = ("every rank is alive, so they likely wait in different collectives (ranks started with different "
                 "layouts or configs)")
    return CollectiveTimeout(f"rank {rank}: {operation} {kind} (parallel.timeout_s={timeout_s:g}); {cause}; run the "
                             f"same command to resume from the last checkpoint")
