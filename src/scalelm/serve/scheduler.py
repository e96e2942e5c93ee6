"""Dynamic batching: one engine thread gathers the requests waiting at that moment into one batch and decodes them
together with `Generator.stream_requests`, whose rows each keep their own budget, sampling, seed, stops and
logprobs.

Why dynamic and not continuous batching: the engine's left-padded KV cache is laid out for one batch at a time,
and every row of a batch already computes what it would alone, so gathering requests costs no change to the model
or the cache. The price is latency, not throughput: a request that arrives while a batch runs waits for that batch
to end (or for every row of it to be cancelled), and a finished row keeps its place until then. Continuous batching
would admit it at the next step but needs a cache whose rows can be inserted and removed mid-flight.

Events go from the engine thread to each request's asyncio queue with `call_soon_threadsafe`; a client that
disconnects cancels its job (a stream when its next chunk cannot be sent, a whole response within a second), its
rows stop at the next step, and an all-cancelled batch ends at once.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from scalelm.infer.generate import Delta, Generator, Request
from scalelm.serve.metrics import ServerMetrics

_END = object()


class Job:
    """One HTTP request's rows (n choices × prompts) and the queue its deltas arrive on."""

    def __init__(self, requests: list[Request], loop: asyncio.AbstractEventLoop):
        self.requests = requests
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.submitted_s = time.perf_counter()
        self.first_token_s: float | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def put(self, item) -> None:
        """From the engine thread: hand a Delta, an exception or the end to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop has closed (server shutting down): nobody is listening
            self.cancelled = True

    async def deltas(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[Delta]:
        """The job's deltas (index = its own row) until every row has ended; an engine error is raised here.
        disconnected: asked whenever no delta came for a second (a request still queued or decoding); true
        cancels the job and ends the iteration."""
        open_rows = len(self.requests)
        while open_rows:
            try:
                item = await asyncio.wait_for(self.events.get(), 1.0) if disconnected else await self.events.get()
            except asyncio.TimeoutError:
                if await disconnected():
                    self.cancel()
                    return
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            if self.first_token_s is None:
                self.first_token_s = time.perf_counter() - self.submitted_s
            open_rows -= item.finish_reason is not None
            yield item


class Scheduler:
    """The engine thread. max_batch: most rows in one batch (a job is never split; one larger than this waits
    alone). gather_s: after the first request of an idle spell arrives, how long to wait for others that come
    with it, so a burst of clients shares one batch."""

    def __init__(self, generator: Generator, metrics: ServerMetrics, max_batch: int = 8, gather_s: float = 0.01):
        self.generator, self.metrics = generator, metrics
        self.max_batch, self.gather_s = max_batch, gather_s
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self.idle = threading.Event()  # set while no batch runs and none waits (tests wait on it)
        self.idle.set()
        self._thread = threading.Thread(target=self._run, name="scalelm-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            self._waiting.append(job)
            self.idle.clear()
            self.metrics.waiting.inc(len(job.requests))
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            for job in self._waiting:
                job.cancel()
            self._cond.notify()
        self._thread.join()

    def _next_batch(self) -> list[Job]:
        with self._cond:
            while not self._waiting and not self._closing:
                self.idle.set()
                self._cond.wait()
            if self._closing:
                return []
        time.sleep(self.gather_s)  # let the rest of a burst arrive
        with self._cond:
            jobs, rows = [], 0
            while self._waiting and (not jobs or rows + len(self._waiting[0].requests) <= self.max_batch):
                job = self._waiting.popleft()
                self.metrics.waiting.dec(len(job.requests))
                if job.cancelled:  # its client left while it waited
                    job.put(_END)
                    continue
                rows += len(job.requests)
                jobs.append(job)
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._next_batch()
            if self._closing:
                return
            if not jobs:
                continue
            owners = [(job, i) for job in jobs for i in range(len(job.requests))]
            self.metrics.batch_size.observe(len(owners))
            try:
                deltas = self.generator.stream_requests([r for job in jobs for r in job.requests],
                                                        cancelled=lambda index, owners=owners: owners[index][0].cancelled)
                for delta in deltas:
                    self.metrics.engine_tokens.inc(len(delta.tokens))
                    job, row = owners[delta.index]
                    job.put(replace(delta, index=row))
            except Exception as e:  # this batch's clients get a 500; the server serves the next batch
                for job in jobs:
                    job.put(e)
            finally:
                for job in jobs:
                    job.put(_END)
