"""The generation engine: prefill, then one token at a time from a pre-allocated KV cache.

`Generator(model, tokenizer).generate(prompts, ...)` returns one `Completion` per prompt; `stream(...)` yields
each piece of text as soon as it is safe to show. A batch of prompts of different lengths is left-padded into one
batch whose rows each compute what that prompt would alone (the cache's mask and positions). Sampling is greedy
or temperature / top-k / top-p with a seeded generator; stop strings end a row across token boundaries and are
not part of its text; an end token ends it too. Without the cache (`use_cache=False`) every step recomputes each
row's whole sequence: the reference the cache is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from scalelm.infer.sampling import Sampling, next_tokens, token_logprobs
from scalelm.infer.stops import StopText
from scalelm.model.gpt import KVCache


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


@dataclass
class Completion:
    """One prompt's generation: the text (stop string excluded), its tokens, why it ended."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None


class Generator:
    """Generates with `model` (a scalelm GPT, or any module with its `forward(tokens, cache)` and `cfg`).

    compile: `torch.compile` the one-token decode step (every step has the same shapes, so it compiles once per
    batch size and cache length); the prefill stays eager. cpu_matmul ("onednn" | "blas" | None = leave the
    model as it is): on an fp32 CPU model, the linear layers' GEMM backend, swapped in by `apply_cpu_kernels` as
    the trainer does; a one-row decode GEMM is memory-bound, and oneDNN spreads it over the cores where MKL may
    not (docs/benchmarks.md#generation)."""

    def __init__(self, model: nn.Module, tokenizer, compile: bool = False, cpu_matmul: str | None = None):
        if cpu_matmul is not None:
            from scalelm.kernels.cpu import apply_cpu_kernels

            apply_cpu_kernels(model, matmul=cpu_matmul, kernels=False)  # skips GPU and tensor-parallel models
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        self.vocab_limit = tokenizer.vocab_size  # rows past it pad the embedding table: never sampled
        self._decode_model = torch.compile(model, dynamic=False) if compile else model

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
        rows = [_Row(StopText(stop)) for _ in prompts]
        if new == 0:
            for index in range(len(rows)):
                yield Delta(index, "", finish_reason="length")
            return
        steps = self._cached_logits(ids, new) if use_cache else self._recomputed_logits(ids)
        with torch.inference_mode():
            logits = next(steps)
            for step in range(new):
                logits = logits.float()
                logits[:, self.vocab_limit:] = float("-inf")
                chosen = next_tokens(logits, sampling, generator)
                chosen_lps = token_logprobs(logits, chosen).tolist() if logprobs else None
                last = step == new - 1
                for index, row in enumerate(rows):
                    if row.done:
                        continue
                    token = int(chosen[index])
                    delta = row.add(self.tokenizer, token, chosen_lps[index] if logprobs else None, eos_id, last)
                    delta.index = index
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
        cache = KVCache(self.cfg.n_layer, longest + new, pad)
        model = self.model
        while True:
            with torch.inference_mode():
                cache.prepare(tokens.shape[1])
                logits = model(tokens, cache=cache)[:, -1]
                cache.advance()
            chosen = yield logits
            tokens, model = chosen[:, None], self._decode_model

    def _recomputed_logits(self, ids: list[list[int]]):
        """The same without a cache: each row's whole sequence through the model for every token."""
        seqs = [list(i) for i in ids]
        while True:
            with torch.inference_mode():
                logits = torch.cat([self.model(torch.tensor([s], device=self.device))[:, -1] for s in seqs])
            chosen = yield logits
            for seq, token in zip(seqs, chosen.tolist()):
                seq.append(token)


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
