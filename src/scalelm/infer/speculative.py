"""Speculative decoding: a small draft model guesses the next k tokens, the target checks them all in one forward.

Each round the draft proposes k tokens one at a time from its own KV cache (fewer where it is unsure, with
`min_confidence`); the target runs one forward over them (after the tokens it has not seen yet) and so has its
next-token logits at all k+1 places. Greedy: the longest prefix of the proposal that the target would have chosen
itself is kept, then the target's own token at the first mismatch (or after all k): 1 to k+1 tokens per target
forward, and the text the target alone would write.
Sampling (temperature > 0) uses the rule of Leviathan et al. 2023 / Chen et al. 2023: keep draft token x with
probability min(1, p(x)/q(x)), else draw from max(p − q, 0) normalized — the output has exactly the target's
distribution (after temperature, top-k, top-p). Both caches are rewound past the rejected tokens.

One prompt at a time (batch size 1). Stop strings, the end token, the context and the vocabulary limit behave as
in `Generator`. Greedy output equals `Generator(target, tokenizer).generate(prompt, n, Sampling(0.0))` up to
floating-point ties: the target's (k+1)-token forward may round differently from its one-token forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from scalelm.infer.generate import Completion, GenerationError, Generator, auto_decode_threads, intra_op_threads
from scalelm.infer.sampling import Sampling, probabilities, token_logprobs
from scalelm.infer.stops import StopText
from scalelm.model.gpt import KVCache


@dataclass
class SpeculativeStats:
    """What one generation cost: draft tokens proposed and accepted, forwards of each model, tokens produced
    (the end token included; tokens of the round after a stop string are not)."""

    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    new_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0.0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers give every id the same meaning: same kind and size, and the same text for each id
    (the character list of a char tokenizer; each id decoded alone otherwise)."""
    if a is b:
        return True
    if getattr(a, "name", None) != getattr(b, "name", None) or a.vocab_size != b.vocab_size:
        return False
    if hasattr(a, "chars") and hasattr(b, "chars"):
        return list(a.chars) == list(b.chars)
    return all(a.decode([i]) == b.decode([i]) for i in range(a.vocab_size))


def accept_sampled(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative sampling rule for B independent rounds: p [B, k+1, V] the target's distributions at the
    k+1 places, q [B, k, V] the draft's, drafts [B, k] the tokens drawn from q → (accepted [B]: how many drafts
    are kept, next [B]: the token after them). Draft i is kept with probability min(1, p_i/q_i) while all before
    it were; at the first rejection the token comes from max(p − q, 0) normalized, after all k from p_{k+1}."""
    bsz, k = drafts.shape
    vocab = p.shape[-1]
    p_d = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(bsz, k, generator=generator, device=p.device, dtype=p.dtype)
    kept = (u * q_d < p_d).long().cumprod(dim=1)  # u < p/q; q_d > 0 as the draft drew it
    accepted = kept.sum(dim=1)
    at = accepted[:, None, None].expand(bsz, 1, vocab)
    p_n = p.gather(1, at).squeeze(1)
    q_n = torch.cat((q, q.new_zeros(bsz, 1, vocab)), dim=1).gather(1, at).squeeze(1)  # after all k: q = 0
    residual = (p_n - q_n).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)  # p == q up to rounding: p itself
    return accepted, torch.multinomial(residual, 1, generator=generator).squeeze(-1)


class SpeculativeDecoder:
    """Generates with `target`, `k` tokens at a time proposed by `draft` (scalelm GPTs, or any modules with their
    `forward(tokens, cache)` and `cfg`) on one device. Both must read the same vocabulary: pass the draft's own
    tokenizer as `draft_tokenizer` to have that checked. decode_threads: intra-op threads of the rounds, as in
    `Generator` (None = `auto_decode_threads` of the target). min_confidence: a round's proposals end early after
    a draft token the draft itself gives less probability than this (0 = always k; see `_propose`)."""

    def __init__(self, target: nn.Module, draft: nn.Module, tokenizer, k: int = 4, draft_tokenizer=None,
                 decode_threads: int | None = None, min_confidence: float = 0.0):
        if k < 1:
            raise GenerationError(f"the draft must propose at least 1 token per round, got k={k}")
        if not 0.0 <= min_confidence < 1.0:
            raise GenerationError(f"min_confidence={min_confidence} must be in [0, 1): the draft's probability of "
                                  "its token below which it stops proposing in a round (0 = always k)")
        if draft_tokenizer is not None and not same_vocabulary(tokenizer, draft_tokenizer):
            raise GenerationError(
                f"the draft's tokenizer ({getattr(draft_tokenizer, 'name', '?')}, {draft_tokenizer.vocab_size} "
                f"tokens) is not the target's ({getattr(tokenizer, 'name', '?')}, {tokenizer.vocab_size} tokens): "
                "train the draft on the same prepared data")
        for role, model in (("target", target), ("draft", draft)):
            if model.cfg.vocab_size < tokenizer.vocab_size:
                raise GenerationError(
                    f"the {role} model has {model.cfg.vocab_size} token rows but the tokenizer {tokenizer.vocab_size}"
                    ": speculative decoding needs both models trained on the same vocabulary")
        device, draft_device = next(target.parameters()).device, next(draft.parameters()).device
        if device != draft_device:
            raise GenerationError(f"the target is on {device} but the draft on {draft_device}; load both on one")
        self.target, self.draft, self.tokenizer, self.k = target.eval(), draft.eval(), tokenizer, k
        self.min_confidence = min_confidence
        self.device = device
        self.vocab_limit = tokenizer.vocab_size
        # The same prompt checks and messages as plain generation; and Generator converts a model for decoding in
        # place (CPU decode kernels), so the draft gets the same conversions as the target.
        self._encoder = Generator(target, tokenizer)
        Generator(draft, tokenizer)
        self.decode_threads = auto_decode_threads(target) if decode_threads is None else decode_threads

    def generate(self, prompt: str, max_new_tokens: int = 64, sampling: Sampling | None = None,
                 seed: int | None = None, stop: Sequence[str] = (), eos_id: int | None = None,
                 logprobs: bool = False) -> tuple[Completion, SpeculativeStats]:
        """The completion of one prompt and what it cost (see the module docstring)."""
        if not isinstance(prompt, str):
            raise GenerationError("speculative decoding takes one prompt (a string) at a time")
        sampling = sampling if sampling is not None else Sampling(0.0)
        if max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 0")
        ids = self._encoder.encode(prompt)
        tcfg, dcfg = self.target.cfg, self.draft.cfg
        new = min(max_new_tokens, tcfg.max_seq_len - len(ids))
        stats = SpeculativeStats()
        out = _Output(self.tokenizer, StopText(stop), eos_id, logprobs)
        if new == 0:
            return out.completion(len(ids)), stats
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        pad = torch.zeros(1, dtype=torch.long, device=self.device)
        tcache = KVCache(tcfg.n_layer, len(ids) + new, pad)
        dcache = KVCache(dcfg.n_layer, min(len(ids) + new, dcfg.max_seq_len), pad)
        seq = list(ids)  # prompt + tokens so far; each cache holds all of it but the last token (or less)
        with torch.inference_mode(), intra_op_threads(self.decode_threads):
            while True:
                left = new - out.produced
                # The round's last token is never fed to a model: at most `left` tokens, draft positions in range.
                k = max(0, min(self.k, left - 1, dcfg.max_seq_len + 1 - len(seq)))
                drafts, q = self._propose(seq, dcache, k, sampling, generator, stats)
                k = drafts.shape[0]  # fewer than asked where the draft lost confidence
                tokens = torch.cat((torch.tensor(seq[tcache.length:], device=self.device), drafts))
                logits = self._logits(self.target, tcache, tokens, k + 1)
                stats.target_forwards += 1
                if sampling.greedy:
                    choice = logits.argmax(dim=-1)
                    accepted = int((choice[:k] == drafts).long().cumprod(dim=0).sum())
                    after = choice[accepted:accepted + 1]
                else:
                    n, after = accept_sampled(probabilities(logits, sampling)[None], q[None], drafts[None],
                                              generator)
                    accepted = int(n)
                round_tokens = torch.cat((drafts[:accepted], after))
                round_lps = token_logprobs(logits[:accepted + 1], round_tokens).tolist() if logprobs else None
                stats.proposed, stats.accepted = stats.proposed + k, stats.accepted + accepted
                round_tokens = round_tokens.tolist()
                for i, token in enumerate(round_tokens):
                    out.add(token, round_lps[i] if logprobs else None)
                    if out.done:
                        break
                seq += round_tokens
                tcache.rewind(len(seq) - 1)
                dcache.rewind(len(seq) - 1)
                if out.done or out.produced >= new:
                    break
        stats.new_tokens = out.produced
        return out.completion(len(ids)), stats

    def _propose(self, seq: list[int], cache: KVCache, k: int, sampling: Sampling, generator, stats):
        """Up to k draft tokens [n] (and, when sampling, the draft's distributions [n, V] they were drawn from); the
        first forward catches the draft up on the tokens of `seq` its cache lacks (the prompt, the last round's).
        With min_confidence, the round's proposals end after a token the draft itself gives less probability than
        that: the tokens after it would mostly be rejected, and each costs a draft forward. Which drafts are
        proposed never changes what the target keeps, so greedy output and the sampled distribution stay exact.
        Without it, nothing is read back to the host here (no device sync per draft token)."""
        drafts, dists = [], []
        tokens = torch.tensor(seq[cache.length:], device=self.device)
        for _ in range(k):
            logits = self._logits(self.draft, cache, tokens, 1)
            stats.draft_forwards += 1
            if sampling.greedy:
                tokens = logits.argmax(dim=-1)
                confidence = logits.softmax(dim=-1).amax() if self.min_confidence else None
            else:
                dist = probabilities(logits, sampling)
                tokens = torch.multinomial(dist, 1, generator=generator)[0]
                dists.append(dist[0])
                confidence = dist[0, tokens[0]] if self.min_confidence else None
            drafts.append(tokens)
            if confidence is not None and float(confidence) < self.min_confidence:
                break
        drafts = torch.cat(drafts) if drafts else torch.zeros(0, dtype=torch.long, device=self.device)
        return drafts, (torch.stack(dists) if dists else torch.zeros(0, self.vocab_limit, device=self.device))

    def _logits(self, model: nn.Module, cache: KVCache, tokens: torch.Tensor, last: int) -> torch.Tensor:
        """tokens [T] through `model` after what `cache` holds → fp32 logits [last, V] of the last places, V the
        tokenizer's vocabulary (rows past it pad the embedding, maybe differently in the two models: dropped)."""
        cache.prepare(tokens.shape[0])
        logits = model(tokens[None], cache=cache)[0, -last:, :self.vocab_limit].float()
        cache.advance()
        return logits


def speculative_generate(target: nn.Module, draft: nn.Module, tokenizer, prompt: str, max_new_tokens: int,
                         k: int = 4, stop: Sequence[str] = (), eos_id: int | None = None,
                         sampling: Sampling | None = None, seed: int | None = None, logprobs: bool = False,
                         draft_tokenizer=None, min_confidence: float = 0.0) -> tuple[Completion, SpeculativeStats]:
    """One prompt's completion by `target` with `draft` proposing `k` tokens a round (greedy unless `sampling`
    says otherwise), and its SpeculativeStats. The CLI's entry point; see SpeculativeDecoder."""
    decoder = SpeculativeDecoder(target, draft, tokenizer, k=k, draft_tokenizer=draft_tokenizer,
                                 min_confidence=min_confidence)
    return decoder.generate(prompt, max_new_tokens, sampling=sampling, seed=seed, stop=stop, eos_id=eos_id,
                            logprobs=logprobs)


class _Output:
    """The completion as it grows, ended by a stop string or the end token exactly as Generator ends a row."""

    def __init__(self, tokenizer, stops: StopText, eos_id: int | None, logprobs: bool):
        self.tokenizer, self.stops, self.eos_id = tokenizer, stops, eos_id
        self.tokens: list[int] = []
        self.logprobs: list[float] | None = [] if logprobs else None
        self.produced, self.done, self.reason = 0, False, "length"

    def add(self, token: int, logprob: float | None) -> None:
        self.produced += 1
        if self.eos_id is not None and token == self.eos_id:  # ends the text and is not part of it
            self.done, self.reason = True, "stop"
            self.stops.feed(self.tokenizer.decode(self.tokens), final=True)
            return
        self.tokens.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        self.stops.feed(self.tokenizer.decode(self.tokens))
        if self.stops.stopped:
            self.done, self.reason = True, "stop"

    def completion(self, prompt_tokens: int) -> Completion:
        return Completion(self.stops.text, self.tokens, self.reason, prompt_tokens, self.logprobs)
