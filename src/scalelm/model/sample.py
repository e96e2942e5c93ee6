"""Autoregressive sampling with the model's KV cache, for the trainer's samples after an evaluation.

`scalelm.infer` is the full generation engine (batches of prompts, stop strings, speculative decoding); the
trainer may not import it, so this small loop is the trainer's.
"""

from __future__ import annotations

import torch
from torch import nn

from scalelm.model.gpt import KVCache


@torch.no_grad()
def sample(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = 50, generator: torch.Generator | None = None, vocab_limit: int | None = None) -> torch.Tensor:
    """prompt [B, T0] → [B, T0 + max_new_tokens]. `vocab_limit` masks padded rows of the vocabulary.

    The prompt is run once into a KV cache, then each token is one forward of one position. When the cache is
    full (max_seq_len positions), it restarts from the last half context, as a cropped context would."""
    was_training = model.training
    model.eval()
    cfg = model.cfg
    ids, cache = prompt, None
    pad = torch.zeros(prompt.shape[0], dtype=torch.long, device=prompt.device)  # rows of equal length
    for _ in range(max_new_tokens):
        if cache is None or cache.length == cfg.max_seq_len:
            new = ids[:, -(cfg.max_seq_len if cache is None else max(1, cfg.max_seq_len // 2)):]
            cache = KVCache(cfg.n_layer, cfg.max_seq_len, pad)
        else:
            new = ids[:, -1:]
        cache.prepare(new.shape[1])
        logits = model(new, cache=cache)[:, -1, :].float()
        cache.advance()
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
