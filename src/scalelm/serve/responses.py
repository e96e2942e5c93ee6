"""OpenAI's response bodies: a whole completion or chat completion, the chunks of a stream, and logprobs in the
shape of each route (completions: parallel lists; chat: one entry per token with its alternatives)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from scalelm.infer.generate import Delta


@dataclass
class Choice:
    """One row's text, tokens and logprobs as its deltas arrive."""

    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.tokens += delta.tokens
        self.logprobs += delta.logprobs or []
        self.top += delta.top_logprobs or []
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokenizer, delta_or_choice: Delta | Choice, offset: int, top: bool) -> dict:
    """{tokens, token_logprobs, top_logprobs, text_offset} of a completion or a piece of it; offsets count
    characters from the prompt's start (the prompt is `offset` characters)."""
    d = delta_or_choice
    alternatives = d.top if isinstance(d, Choice) else (d.top_logprobs or [])
    pieces = [tokenizer.decode([t]) for t in d.tokens]
    offsets, at = [], offset
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": pieces, "token_logprobs": list(d.logprobs or []),
            "top_logprobs": [{tokenizer.decode([i]): lp for i, lp in alt.items()} for alt in alternatives]
            if top else None, "text_offset": offsets}


def chat_logprobs(tokenizer, tokens: list[int], logprobs: list[float], alternatives: list[dict[int, float]],
                  top: bool) -> dict:
    """{content: [{token, logprob, bytes, top_logprobs}], refusal}."""

    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for i, (token_id, logprob) in enumerate(zip(tokens, logprobs)):
        item = entry(token_id, logprob)
        item["top_logprobs"] = [entry(t, lp) for t, lp in alternatives[i].items()] if top else []
        content.append(item)
    return {"content": content, "refusal": None}


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
