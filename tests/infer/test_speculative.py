"""Speculative decoding: greedy output identical to the target alone with drafts good and bad, stats that add up,
the edges (k=1, the context, a draft with a shorter context, stop strings, the end token), refused mismatches,
and sampling with exactly the target's distribution (the rule by itself, and end to end).

Models are small, untrained and in float64, so an argmax never hangs on a rounding difference between the
target's one-token and (k+1)-token forwards: any difference from the target alone is a bug."""

from __future__ import annotations

import string
from dataclasses import replace

import pytest
import torch

from scalelm.data.tokenizer import CharTokenizer
from scalelm.infer.generate import GenerationError, Generator
from scalelm.infer.sampling import Sampling, probabilities
from scalelm.infer.speculative import SpeculativeDecoder, accept_sampled, same_vocabulary, speculative_generate
from scalelm.model import get_preset
from scalelm.model.gpt import GPT

TOK = CharTokenizer.from_text(string.ascii_letters + string.digits + " .,;:!?'\n-")  # 72 ids; models have 128 rows
GPT2_LIKE = dict(mlp="gelu", pos="learned", norm="layernorm", bias=True, tie_embeddings=False, n_kv_head=None)
# Untied heads: a random tied model mostly repeats its input, and two random drafts would then agree.
SHAPES = {"mha-learned": GPT2_LIKE, "gqa-rope": dict(n_kv_head=2, pos="rope", tie_embeddings=False)}
NEW = 12
# 20 prompts of 1 to 63 characters; the tiny context is 64, so the longest leave room for 1 to 3 new tokens.
PROMPTS = ["a", "Hi", "The", "abc d", "0123456", "Once upon", "to be or not", "what light through",
           "Now is the winter of", "All the world's a stage, and", "friends, Romans, countrymen: lend me",
           "x" * 40, "So shaken as we are, so wan with care, find", "ab" * 25 + "!", "q w e r t y " * 4 + "zz",
           "L" * 55, "The quality of mercy is not strained; it droppeth", "m" * 61, "Lorem ipsum " * 5 + "abc",
           "Z" * 63]


def model(shape: str, seed: int, **override) -> GPT:
    torch.manual_seed(seed)
    cfg = replace(get_preset("tiny"), **{"n_layer": 2, "init_std": 0.05, **SHAPES[shape], **override})
    return GPT(cfg).double().eval()


def first_layers(target: GPT, n: int) -> GPT:
    """A draft made of the target's first n blocks with its embeddings, final norm and head (an early exit)."""
    draft = GPT(replace(target.cfg, n_layer=n)).double().eval()
    draft.load_state_dict({name: t for name, t in target.state_dict().items()
                           if not name.startswith("layers.") or int(name.split(".")[1]) < n})
    return draft


def reference(target: GPT, prompts=PROMPTS, new: int = NEW, **kwargs) -> list:
    """The target alone: one prompt at a time, as speculative decoding runs."""
    gen = Generator(target, TOK)
    return [gen.generate(p, new, Sampling(0.0), **kwargs)[0] for p in prompts]


def check_stats(stats, completion, k: int) -> None:
    assert stats.draft_forwards == stats.proposed  # one draft forward per proposed token
    assert 0 <= stats.accepted <= stats.proposed
    assert stats.new_tokens == len(completion.tokens)
    assert stats.target_forwards <= stats.new_tokens <= stats.target_forwards * (k + 1)  # 1..k+1 tokens a round


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_identical_to_target_alone(shape):
    target = model(shape, 0)
    drafts = {"random": (model(shape, 1, n_layer=1), 3), "itself": (target, 4), "first layer": (first_layers(target, 1), 4)}
    rates, refs = {}, reference(target)
    for name, (draft, k) in drafts.items():
        decoder = SpeculativeDecoder(target, draft, TOK, k=k)
        accepted = proposed = 0
        for prompt, ref in zip(PROMPTS, refs):
            got, stats = decoder.generate(prompt, NEW)
            assert (got.tokens, got.text, got.finish_reason, got.prompt_tokens) == \
                (ref.tokens, ref.text, ref.finish_reason, ref.prompt_tokens), (name, prompt)
            check_stats(stats, got, k)
            accepted, proposed = accepted + stats.accepted, proposed + stats.proposed
            if draft is target:  # every round accepts all it proposes: k+1 tokens a round (less at the end)
                assert stats.accepted == stats.proposed
                assert stats.target_forwards == -(-len(ref.tokens) // (k + 1))
        rates[name] = accepted / proposed
    assert rates["random"] < 0.1 and rates["itself"] == 1.0
    assert 0.2 < rates["first layer"] < 0.9  # a fair approximation: rounds that keep some drafts, not all


@pytest.mark.parametrize("k", [1, 2, 7])
def test_other_k(k):
    target = model("gqa-rope", 0)
    draft = first_layers(target, 1)
    for prompt, ref in zip(PROMPTS[::3], reference(target, PROMPTS[::3])):
        got, stats = speculative_generate(target, draft, TOK, prompt, NEW, k=k)
        assert got.tokens == ref.tokens
        check_stats(stats, got, k)


def test_context_limit_and_shorter_draft_context():
    """Up to the target's context; a draft whose context is shorter proposes while it can, then the target goes
    on alone. Learned positions: a position past either table would fail loudly."""
    target = model("mha-learned", 0)
    short = GPT(replace(target.cfg, max_seq_len=24)).double().eval()
    short.load_state_dict({n: t[:24] if n == "pos_embeddings.weight" else t for n, t in target.state_dict().items()})
    prompts = ["x" * 20, "y" * 23, "z" * 24, "v" * 60, "u" * 63]
    for prompt, ref in zip(prompts, reference(target, prompts, new=64)):
        assert len(prompt) + len(ref.tokens) == 64 and ref.finish_reason == "length"
        for draft in (target, short):
            got, stats = speculative_generate(target, draft, TOK, prompt, 64, k=4)
            assert got.tokens == ref.tokens and got.finish_reason == "length"
            check_stats(stats, got, 4)
    got, stats = speculative_generate(target, short, TOK, "v" * 60, 64, k=4)
    assert stats.proposed == 0 and stats.target_forwards == 4  # no draft past its context


def test_stop_string_end_token_and_logprobs():
    target = model("gqa-rope", 0)
    draft = first_layers(target, 1)
    plain = reference(target, PROMPTS[:6], new=20)
    for prompt, ref in zip(PROMPTS[:6], plain):
        stop = ref.text[7:9]  # stops mid-round, across a round boundary or at once, depending on the prompt
        eos = ref.tokens[5]
        for kwargs in (dict(stop=[stop, "never"]), dict(eos_id=eos), dict(logprobs=True)):
            want = reference(target, [prompt], new=20, **kwargs)[0]
            got, stats = speculative_generate(target, draft, TOK, prompt, 20, k=4, **kwargs)
            assert (got.text, got.tokens, got.finish_reason) == (want.text, want.tokens, want.finish_reason), kwargs
            if "logprobs" in kwargs:
                assert got.logprobs == pytest.approx(want.logprobs, abs=1e-9)
            else:
                assert got.finish_reason == "stop" and got.logprobs is None
    got, _ = speculative_generate(target, draft, TOK, "abc", 0)
    assert (got.text, got.tokens, got.finish_reason) == ("", [], "length")


def test_refuses_mismatched_vocabularies_and_bad_requests():
    target = model("gqa-rope", 0)
    other = CharTokenizer.from_text("abc")
    assert same_vocabulary(TOK, CharTokenizer.from_text(TOK.chars)) and not same_vocabulary(TOK, other)
    with pytest.raises(GenerationError, match="the draft's tokenizer") as e:
        SpeculativeDecoder(target, target, TOK, draft_tokenizer=other)
    assert "\n" not in str(e.value)
    with pytest.raises(GenerationError, match="draft model has 64 token rows"):
        SpeculativeDecoder(target, model("gqa-rope", 1, vocab_size=64), TOK)
    with pytest.raises(GenerationError, match="at least 1"):
        SpeculativeDecoder(target, target, TOK, k=0)
    with pytest.raises(GenerationError, match="context is 64"):
        speculative_generate(target, target, TOK, "x" * 64, 5)
    with pytest.raises(GenerationError, match="one prompt"):
        speculative_generate(target, target, TOK, ["a", "b"], 5)


# ---- sampling -------------------------------------------------------------------------------------------------
def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of observed counts against probabilities (cells of probability 0 must stay empty)."""
    assert counts[probs == 0].sum() == 0
    expected = probs * counts.sum()
    nonzero = probs > 0
    return float(((counts[nonzero] - expected[nonzero]) ** 2 / expected[nonzero]).sum())


def test_sampling_rule_gives_the_target_distribution():
    """Two drafts a round over 4 tokens, 300k rounds at once: the first three tokens (completed from the target
    where the round ended sooner) follow the target's joint distribution, not the draft's."""
    g = torch.Generator().manual_seed(0)
    vocab, rounds = 4, 300_000

    def dists(*shape, zero_some=False):
        p = torch.rand(*shape, vocab, generator=g, dtype=torch.float64) ** 3
        if zero_some:  # as top-k / top-p leave them
            p[..., 0] = 0
        return p / p.sum(-1, keepdim=True)

    p1, p2, p3 = dists(), dists(vocab, zero_some=True), dists(vocab, vocab)
    q1, q2 = dists(), dists(vocab)

    def draw(probs):
        return torch.multinomial(probs, 1, replacement=True, generator=g).squeeze(-1)

    d1 = draw(q1.expand(rounds, vocab))
    d2 = draw(q2[d1])
    n, nxt = accept_sampled(torch.stack((p1.expand(rounds, vocab), p2[d1], p3[d1, d2]), 1),
                            torch.stack((q1.expand(rounds, vocab), q2[d1]), 1), torch.stack((d1, d2), 1), g)
    x1 = torch.where(n >= 1, d1, nxt)
    x2 = torch.where(n >= 2, d2, torch.where(n == 1, nxt, draw(p2[x1])))
    x3 = torch.where(n == 2, nxt, draw(p3[x1, x2]))
    counts = torch.bincount((x1 * vocab + x2) * vocab + x3, minlength=vocab ** 3).double()
    joint = (p1[:, None, None] * p2[:, :, None] * p3).flatten()
    assert chi_square(counts, joint) < 130  # 47 degrees of freedom: p < 1e-9 beyond 130
    # the draft's own joint is far off (the test can tell them apart)
    assert chi_square(counts, (q1[:, None, None] * q2[:, :, None] * p3).flatten() + 1e-12) > 1000
    assert 0 < (n == 0).float().mean() < 1 and (n == 2).float().mean() > 0
    drafts = draw(p1.expand(100, vocab))[:, None]
    same, _ = accept_sampled(p1.expand(100, 2, vocab), p1.expand(100, 1, vocab), drafts, g)
    assert (same == 1).all()  # p == q: always accepted


def _sharp_pair():
    """A 4-character tokenizer, two unlike 1-layer models with sharp distributions (fp64), top-k 3 sampling."""
    tok = CharTokenizer.from_text("abcd")
    torch.manual_seed(0)
    cfg = replace(get_preset("tiny"), n_layer=1, init_std=0.5)
    return tok, GPT(cfg).double().eval(), GPT(cfg).double().eval(), Sampling(temperature=0.9, top_k=3)


def test_sampling_end_to_end_matches_target_distribution():
    """Two tokens over a 4-character vocabulary (the models' other 124 rows cut off), top-k 3, a draft unlike the
    target: 400 seeded generations against the target's exact joint of the two tokens."""
    tok, target, draft, sampling = _sharp_pair()
    with torch.inference_mode():
        def dist(ids):
            return probabilities(target(torch.tensor([ids]))[0, -1:, :4].float(), sampling)[0].double()
        prompt = tok.encode("abca")
        p1 = dist(prompt)
        joint = torch.stack([p1[a] * dist(prompt + [a]) for a in range(4)]).flatten()
    decoder = SpeculativeDecoder(target, draft, tok, k=1)
    counts, accepted = torch.zeros(16, dtype=torch.float64), 0
    for seed in range(400):
        got, stats = decoder.generate("abca", 2, sampling=sampling, seed=seed)
        counts[got.tokens[0] * 4 + got.tokens[1]] += 1
        accepted += stats.accepted
    assert chi_square(counts, joint) < 35  # at most 8 degrees of freedom (top-k 3): p < 1e-4 beyond 35
    assert 0.1 < accepted / 400 < 0.9  # both paths taken: drafts kept and replaced
    again, _ = decoder.generate("abca", 2, sampling=sampling, seed=7)
    assert again.tokens == decoder.generate("abca", 2, sampling=sampling, seed=7)[0].tokens  # seeded


def test_sampling_with_itself_accepts_everything():
    target = model("gqa-rope", 0)
    for prompt in PROMPTS[:4]:
        got, stats = speculative_generate(target, target, TOK, prompt, NEW, k=3, sampling=Sampling(1.0, top_p=0.9),
                                          seed=1)
        assert stats.acceptance_rate == 1.0 and len(got.tokens) == NEW


def test_probabilities_match_next_tokens():
    """The distribution the rule uses is the one plain sampling draws from (temperature, top-k, top-p)."""
    from scalelm.infer.sampling import next_tokens

    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(0)).expand(20_000, 10)
    for sampling in (Sampling(0.7), Sampling(1.0, top_k=3), Sampling(1.3, top_p=0.6), Sampling(0.8, 4, 0.8)):
        probs = probabilities(logits[:1], sampling)[0]
        drawn = next_tokens(logits, sampling, torch.Generator().manual_seed(1))
        counts = torch.bincount(drawn, minlength=10).double()
        assert chi_square(counts, probs.double()) < 40, sampling


# ---- fewer drafts where the draft is unsure ------------------------------------------------------------------
def test_min_confidence_keeps_greedy_output_with_fewer_drafts():
    target = model("gqa-rope", 0)
    draft = first_layers(target, 1)
    refs = reference(target)
    proposed = {}
    for min_confidence in (0.0, 0.025, 0.03):  # the untrained draft's probabilities are near 1/72 (0.014)
        decoder = SpeculativeDecoder(target, draft, TOK, k=4, min_confidence=min_confidence)
        proposed[min_confidence] = 0
        for prompt, ref in zip(PROMPTS, refs):
            got, stats = decoder.generate(prompt, NEW)
            assert (got.tokens, got.finish_reason) == (ref.tokens, ref.finish_reason), (min_confidence, prompt)
            check_stats(stats, got, 4)
            proposed[min_confidence] += stats.proposed
    assert proposed[0.0] > proposed[0.025] > proposed[0.03] > 0
    with pytest.raises(GenerationError, match="min_confidence=1"):
        SpeculativeDecoder(target, draft, TOK, min_confidence=1.0)


def test_min_confidence_sampling_keeps_the_target_distribution():
    """Three tokens, k=2, a threshold that ends some rounds after one draft and not others: 1500 seeded
    generations against the target's exact joint of the three tokens."""
    tok, target, draft, sampling = _sharp_pair()
    with torch.inference_mode():
        def dist(model, ids):
            return probabilities(model(torch.tensor([ids]))[0, -1:, :4].float(), sampling)[0].double()
        prompt = tok.encode("abca")
        p = {(a, b): dist(target, prompt + [a, b]) for a in range(4) for b in range(4)}
        p2 = {a: dist(target, prompt + [a]) for a in range(4)}
        p1 = dist(target, prompt)
        joint = torch.stack([p1[a] * p2[a][b] * p[a, b] for a in range(4) for b in range(4)]).flatten()
        q1 = dist(draft, prompt)
    threshold = float(q1[q1 > 0].median())  # the first draft's probability is above it for some tokens only
    decoder = SpeculativeDecoder(target, draft, tok, k=2, min_confidence=threshold)
    counts, proposed = torch.zeros(64, dtype=torch.float64), set()
    for seed in range(1500):
        got, stats = decoder.generate("abca", 3, sampling=sampling, seed=seed)
        a, b, c = got.tokens
        counts[(a * 4 + b) * 4 + c] += 1
        proposed.add(stats.proposed)
    assert {1, 2} <= proposed  # rounds that stopped after one draft, and full ones
    assert chi_square(counts, joint) < 60  # at most 26 degrees of freedom (top-k 3): p < 1e-4 beyond 60
