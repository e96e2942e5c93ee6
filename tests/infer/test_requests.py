"""`Generator.stream_requests`: a batch whose rows each bring their own budget, sampling, seed, stops and logprobs
gives every row what it would get alone."""

from dataclasses import replace

import pytest
import torch

from scalelm.data.tokenizer import CharTokenizer
from scalelm.infer import GenerationError, Generator, Request, Sampling
from scalelm.model import get_preset
from scalelm.model.gpt import GPT

TOKENIZER = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ,.!?\n")


def _generator(max_seq_len: int = 64) -> Generator:
    torch.manual_seed(0)
    return Generator(GPT(replace(get_preset("tiny"), vocab_size=64, max_seq_len=max_seq_len)).eval(), TOKENIZER)


def _collect(gen: Generator, requests: list[Request], cancelled=None) -> list[dict]:
    rows = [dict(text="", tokens=[], logprobs=[], top=[], reason=None) for _ in requests]
    for d in gen.stream_requests(requests, cancelled):
        row = rows[d.index]
        assert row["reason"] is None  # nothing after a row's end
        row["text"] += d.text
        row["tokens"] += d.tokens
        row["logprobs"] += d.logprobs or []
        row["top"] += d.top_logprobs or []
        row["reason"] = d.finish_reason
    return rows


def test_each_row_of_a_mixed_batch_is_what_it_would_be_alone():
    gen = _generator()
    requests = [Request("to be or not", 12, Sampling(0.0), logprobs=True, top_logprobs=2),
                Request("a", 20, Sampling(0.8, top_p=0.9), seed=3),
                Request("the quick brown fox", 5, Sampling(1.0, top_k=5), seed=4, stop=("zz",)),
                Request("hello", 0)]
    batched = _collect(gen, requests)
    for request, row in zip(requests, batched):
        alone = gen.generate(request.prompt, request.max_new_tokens, request.sampling, seed=request.seed,
                             stop=request.stop, logprobs=request.logprobs)[0]
        assert (row["text"], row["tokens"], row["reason"]) == (alone.text, alone.tokens, alone.finish_reason)
        if request.logprobs:
            assert row["logprobs"] == pytest.approx(alone.logprobs, abs=1e-5)
    assert [len(t) for t in batched[0]["top"]] == [2] * 12
    assert all(max(t.values()) == pytest.approx(lp, abs=1e-6) for t, lp in zip(batched[0]["top"], batched[0]["logprobs"]))


def test_each_row_is_bounded_by_the_context_from_its_own_prompt():
    gen = _generator(max_seq_len=32)
    rows = _collect(gen, [Request("a" * 28, 10, Sampling(0.0)), Request("a", 10, Sampling(0.0))])
    assert [len(r["tokens"]) for r in rows] == [4, 10]
    assert [r["reason"] for r in rows] == ["length", "length"]


def test_a_cancelled_row_ends_silently_and_the_others_go_on():
    gen = _generator()
    rows = _collect(gen, [Request("abc", 30, Sampling(0.0)), Request("abc", 30, Sampling(0.0))],
                    cancelled=lambda index: index == 0)
    assert rows[0]["tokens"] == [] and rows[0]["reason"] is None
    assert len(rows[1]["tokens"]) == 30


def test_a_negative_budget_is_refused():
    with pytest.raises(GenerationError, match="max_new_tokens"):
        list(_generator().stream_requests([Request("a", -1)]))
