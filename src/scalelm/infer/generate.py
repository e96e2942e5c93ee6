"""The generation engine: prefill, then one token at a time from a pre-allocated KV cache.

`Generator(model, tokenizer).generate(prompts, ...)` returns one `Completion` per prompt; `stream(...)` yields
each piece of text as soon as it is safe to show. A batch of prompts of different lengths is left-padded into one
batch whose rows each compute what that prompt would alone (the cache's mask and positions). Sampling is greedy
or temperature / top-k / top-p with a seeded generator; stop strings end a row across token boundaries and are
not part of its text; an end token ends it too. Without the cache (`use_cache=False`) every step recomputes each
row's whole sequence: the reference the cache is tested against. `stream_requests` batches rows that each bring
their own settings (`Request`: token budget, sampling, seed, stops, logprobs), as a server's concurrent requests do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from scalelm.infer.sampling import Sampling, next_tokens
from scalelm.infer.stops import StopText
from scalelm.infer.threads import ThreadChoice
from scalelm.model.gpt import KVCache

# A decode step of a model with fewer weight bytes than this is a chain of tiny operators (a few µs of work each):
# splitting them over threads costs more in fork/join than it saves, and where a neighbour process holds a core,
# every parallel region waits for a descheduled thread. Larger models stream their weights, where threads add
# memory bandwidth.
SMALL_DECODE_BYTES = 64 * 2**20


def _cpu_weight_bytes(model: nn.Module) -> int | None:
    """Bytes of `model`'s parameters where they live on the CPU; None for a model elsewhere or without any."""
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu":
        return None
    return sum(p.numel() * p.element_size() for p in params)


def auto_decode_threads(model: nn.Module) -> int:
    """Intra-op threads for `model`'s one-token decode steps: 1 for a small model on the CPU, else 0 (PyTorch's
    own setting)."""
    size = _cpu_weight_bytes(model)
    return 1 if size is not None and size < SMALL_DECODE_BYTES else 0


def auto_decode_kernels(model: nn.Module) -> bool:
    """Whether the engine takes scalelm's decode kernel for `model` by default: a CPU model whose decode steps
    stream their weights from memory (not a small one, whose steps are dispatch-bound and run on one thread)."""
    size = _cpu_weight_bytes(model)
    return size is not None and size >= SMALL_DECODE_BYTES


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads (0: leave PyTorch's setting), restored after it."""
    before = torch.get_num_threads()
    if n <= 0 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class GenerationError(ValueError):
    """A request the engine cannot serve (a prompt too long or empty), phrased for the person who made it."""


@dataclass
class Delta:
    """A new piece of row `index`'s text; `finish_reason` ("stop": a stop string or the end token; "length": the
    token budget or the context) is set on the row's last piece, and tokens/logprobs are those it adds."""

    index: int
    text: str
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    top_logprobs: list[dict[int, float]] | None = None  # per token: the likeliest ids → log p (Request.top_logprobs)


@dataclass
class Completion:
    """One prompt's generation: the text (stop string excluded), its tokens, why it ended."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None


@dataclass(frozen=True)
class Request:
    """One row of a `stream_requests` batch with its own settings. seed: the row draws from its own generator, so
    its text is the same whichever rows share its batch (and equals `generate(prompt, seed=seed)` alone); None: the
    global RNG. top_logprobs: also report the log probabilities of this many likeliest tokens at each step."""

    prompt: str
    max_new_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    eos_id: int | None = None


class Generator:
    """Generates with `model` (a scalelm GPT, or any module with its `forward(tokens, cache)` and `cfg`).

    compile: `torch.compile` the one-token decode step (every step has the same shapes, so it compiles once per
    batch size and cache length); the prefill stays eager. cpu_matmul ("onednn" | "blas" | None = leave the
    model as it is): on an fp32 CPU model, the linear layers' GEMM backend, swapped in by `apply_cpu_kernels` as
    the trainer does; a one-row decode GEMM is memory-bound, and oneDNN spreads it over the cores where MKL may
    not (docs/benchmarks.md#generation). decode_threads: intra-op threads of the cached decode steps (the prefill
    and the no-cache path keep PyTorch's setting); None = `auto_decode_threads` (1 for a small CPU model; for a
    large one, PyTorch's setting or 1, whichever its steps run faster under the machine's present load:
    `ThreadChoice`), 0 = PyTorch's setting, n = n threads. decode_kernels: on a CPU model, the linear layers'
    few-row products (the decode steps) by scalelm's streaming kernel, which splits each over the intra-op threads,
    with the weights on huge pages (`apply_decode_kernels`; where it cannot be built, PyTorch's own); None =
    `auto_decode_kernels` (on for a CPU model of 64 MiB or more). PyTorch's one-row product reads on one thread,
    well below the memory's rate (bench/generate.py compares the two)."""

    def __init__(self, model: nn.Module, tokenizer, compile: bool = False, cpu_matmul: str | None = None,
                 decode_threads: int | None = None, decode_kernels: bool | None = None):
        if cpu_matmul is not None:
            from scalelm.kernels.cpu import apply_cpu_kernels

            apply_cpu_kernels(model, matmul=cpu_matmul, kernels=False)  # skips GPU and tensor-parallel models
        large = auto_decode_kernels(model)
        if large if decode_kernels is None else decode_kernels:
            from scalelm.kernels.cpu.decode import apply_decode_kernels

            apply_decode_kernels(model)  # skips GPU and tensor-parallel models
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        # A module that runs elsewhere (an ONNX runtime session) names its device; a PyTorch model has parameters.
        self.device = getattr(model, "device", None) or next(model.parameters()).device
        self.vocab_limit = tokenizer.vocab_size  # rows past it pad the embedding table: never sampled
        self._decode_model = torch.compile(model, dynamic=False) if compile else model
        self.decode_threads = auto_decode_threads(model) if decode_threads is None else decode_threads
        # A large CPU model's steps on all threads or on one, whichever the machine's load makes faster.
        self.thread_choice = (ThreadChoice() if decode_threads is None and large and torch.get_num_threads() > 1
                              else None)

    # ---- the public API -----------------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, sampling: Sampling | None = None,
                 seed: int | None = None, stop: Sequence[str] = (), eos_id: int | None = None,
                 logprobs: bool = False, use_cache: bool = True) -> list[Completion]:
        """One Completion per prompt (a single string: a list of one)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts: list[list[str]] = [[] for _ in prompts]
        tokens: list[list[int]] = [[] for _ in prompts]
        lps: list[list[float]] = [[] for _ in prompts]
        reasons: list[str] = ["length"] * len(prompts)
        for delta in self.stream(prompts, max_new_tokens, sampling, seed, stop, eos_id, logprobs, use_cache):
            texts[delta.index].append(delta.text)
            tokens[delta.index] += delta.tokens
            lps[delta.index] += delta.logprobs or []
            if delta.finish_reason:
                reasons[delta.index] = delta.finish_reason
        lengths = [len(self.encode(p)) for p in prompts]
        return [Completion("".join(t), ids, r, n, lp if logprobs else None)
                for t, ids, r, n, lp in zip(texts, tokens, reasons, lengths, lps)]

    def stream(self, prompts: str | Sequence[str], max_new_tokens: int = 64, sampling: Sampling | None = None,
               seed: int | None = None, stop: Sequence[str] = (), eos_id: int | None = None,
               logprobs: bool = False, use_cache: bool = True) -> Iterator[Delta]:
        """Deltas of every row as they are produced; each row ends with one whose finish_reason is set."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        sampling = sampling or Sampling()
        if max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 0")
        ids = [self.encode(p) for p in prompts]
        longest = max(len(i) for i in ids)
        new = min(max_new_tokens, self.cfg.max_seq_len - longest)  # the context bounds the longest row
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        requests = [Request(p, new, sampling, stop=tuple(stop), logprobs=logprobs, eos_id=eos_id) for p in prompts]
        yield from self._decode(ids, requests, [new] * len(ids), lambda logits: next_tokens(logits, sampling, generator),
                                use_cache)

    def stream_requests(self, requests: Sequence[Request],
                        cancelled: Callable[[int], bool] | None = None) -> Iterator[Delta]:
        """Deltas of a batch whose rows each follow their own Request; a row's budget is bounded by the context
        from its own prompt length. `cancelled(index)` true ends that row silently (its client went away); the
        batch ends when every row has."""
        for r in requests:
            if r.max_new_tokens < 0:
                raise GenerationError(f"max_new_tokens={r.max_new_tokens} must be >= 0")
        ids = [self.encode(r.prompt) for r in requests]
        limits = [min(r.max_new_tokens, self.cfg.max_seq_len - len(i)) for r, i in zip(requests, ids)]
        generators = [torch.Generator(self.device).manual_seed(r.seed) if r.seed is not None else None
                      for r in requests]

        def choose(logits: torch.Tensor) -> torch.Tensor:
            chosen = logits.argmax(dim=-1)  # the greedy rows; the others are drawn below
            shared: dict[Sampling, list[int]] = {}  # unseeded rows with the same settings: one draw together
            for index, (r, g) in enumerate(zip(requests, generators)):
                if r.sampling.greedy:
                    continue
                if g is None:
                    shared.setdefault(r.sampling, []).append(index)
                else:
                    chosen[index] = next_tokens(logits[index:index + 1], r.sampling, g)[0]
            for sampling, rows in shared.items():
                chosen[rows] = next_tokens(logits[rows], sampling)
            return chosen

        yield from self._decode(ids, list(requests), limits, choose, True, cancelled)

    def _decode(self, ids: list[list[int]], requests: list[Request], limits: list[int],
                choose: Callable[[torch.Tensor], torch.Tensor], use_cache: bool,
                cancelled: Callable[[int], bool] | None = None) -> Iterator[Delta]:
        """The loop both streams share: row i yields up to limits[i] tokens, each chosen by `choose`."""
        rows = [_Row(StopText(r.stop)) for r in requests]
        for index, limit in enumerate(limits):
            if limit == 0:
                rows[index].done = True
                yield Delta(index, "", finish_reason="length")
        if all(row.done for row in rows):
            return
        new = max(limits)
        want_logprobs = any(r.logprobs for r in requests)
        top = max(r.top_logprobs for r in requests)
        # Each row's positions count from its own first token: a short prompt with a larger budget may use more
        # slots of the shared buffer than the context holds while its positions stay inside it.
        steps = self._cached_logits(ids, new) if use_cache else self._recomputed_logits(ids)
        with torch.inference_mode():
            logits = next(steps)
            for step in range(new):
                logits = logits.float()
                logits[:, self.vocab_limit:] = float("-inf")
                chosen = choose(logits)
                chosen_lps = alternatives = None
                if want_logprobs:
                    log_probs = logits.log_softmax(dim=-1)
                    chosen_lps = log_probs.gather(-1, chosen[:, None]).squeeze(-1).tolist()
                    if top:
                        values, indices = log_probs.topk(top, dim=-1)
                        alternatives = [dict(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
                for index, row in enumerate(rows):
                    if row.done:
                        continue
                    if cancelled is not None and cancelled(index):
                        row.done = True
                        continue
                    r = requests[index]
                    token = int(chosen[index])
                    delta = row.add(self.tokenizer, token, chosen_lps[index] if r.logprobs else None, r.eos_id,
                                    step == limits[index] - 1)
                    delta.index = index
                    if r.top_logprobs and delta.tokens:
                        delta.top_logprobs = [dict(list(alternatives[index].items())[:r.top_logprobs])]
                    yield delta
                if all(row.done for row in rows):
                    return
                logits = steps.send(chosen)

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids; a GenerationError if it is empty or does not fit the context."""
        try:
            ids = self.tokenizer.encode(prompt)
        except ValueError as e:
            raise GenerationError(f"the prompt cannot be encoded by this model's tokenizer: {e}") from None
        if not ids:
            raise GenerationError("the prompt is empty; give at least one character to continue")
        if len(ids) >= self.cfg.max_seq_len:
            raise GenerationError(f"the prompt has {len(ids)} tokens but the model's context is "
                                  f"{self.cfg.max_seq_len}: shorten it to at most {self.cfg.max_seq_len - 1}")
        return ids

    # ---- the two ways to the next logits --------------------------------------------------------------------
    def _cached_logits(self, ids: list[list[int]], new: int):
        """A generator: first the prefill's last logits [B, V], then, for each token batch sent in, the next."""
        longest = max(len(i) for i in ids)
        pad = torch.tensor([longest - len(i) for i in ids], device=self.device)
        tokens = torch.tensor([[0] * (longest - len(i)) + i for i in ids], device=self.device)  # left padding
        cache = _BoundedCache(self.cfg.n_layer, longest + new, pad, self.cfg.max_seq_len - 1)
        model, threads, step = self.model, 0, 0  # the prefill with PyTorch's threads, then the decode steps'
        choice = self.thread_choice
        while True:
            if step and choice is not None:
                threads = choice.pick(len(ids))
            start = time.perf_counter()
            with torch.inference_mode(), intra_op_threads(threads):
                cache.prepare(tokens.shape[1])
                logits = model(tokens, cache=cache)[:, -1]
                cache.advance()
            if step > 1 and choice is not None:  # the first decode step also allocates (or compiles): not timed
                choice.record(threads, time.perf_counter() - start, len(ids))
            chosen = yield logits
            tokens, model, threads, step = chosen[:, None], self._decode_model, self.decode_threads, step + 1

    def _recomputed_logits(self, ids: list[list[int]]):
        """The same without a cache: each row's whole sequence through the model for every token."""
        seqs = [list(i) for i in ids]
        while True:
            with torch.inference_mode():
                logits = torch.cat([self.model(torch.tensor([s], device=self.device))[:, -1] for s in seqs])
            chosen = yield logits
            for seq, token in zip(seqs, chosen.tolist()):
                seq.append(token)


class _BoundedCache(KVCache):
    """A KVCache whose positions stop at the context's last one. A row that has ended keeps its place in the batch
    while others with shorter prompts go on (stream_requests bounds each row by its own prompt), so its positions
    would run past the position tables; its outputs are discarded, and live rows never reach the bound."""

    def __init__(self, n_layer: int, max_len: int, pad: torch.Tensor, last_position: int):
        super().__init__(n_layer, max_len, pad)
        self.last_position = last_position

    def prepare(self, n_new: int) -> None:
        super().prepare(n_new)
        self.positions = self.positions.clamp(max=self.last_position)


class _Row:
    """One prompt's progress: its tokens, its text so far and whether it has ended."""

    def __init__(self, stops: StopText):
        self.stops, self.tokens, self.done = stops, [], False

    def add(self, tokenizer, token: int | None, logprob: float | None, eos_id: int | None, last: bool) -> Delta:
        reason = None
        if eos_id is not None and token == eos_id:  # the end token ends the row and is not part of it
            reason, token, logprob = "stop", None, None
        else:
            self.tokens.append(token)
        text = self.stops.feed(tokenizer.decode(self.tokens), final=last or reason is not None)
        if self.stops.stopped:
            reason = "stop"
        elif last and reason is None:
            reason = "length"
        self.done = reason is not None
        return Delta(0, text, [token] if token is not None else [], [logprob] if logprob is not None else None,
                     reason)
