"""Plain autoregressive sampling (no KV cache): re-runs the cropped context each token.

Good enough for the trainer's eval samples on small models; `scalelm.infer` adds KV-cache generation.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def sample(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = 50, generator: torch.Generator | None = None, vocab_limit: int | None = None) -> torch.Tensor:
    """prompt [B, T0] → [B, T0 + max_new_tokens]. `vocab_limit` masks padded rows of the vocabulary."""
    was_training = model.training
    model.eval()
    ids = prompt
    ctx = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(ids[:, -ctx:])[:, -1, :].float()
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    model.train(was_training)
    return ids
