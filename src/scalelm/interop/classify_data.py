"""Labelled text for classification: JSONL lines with `text` and `label`, a seeded held-out split, and the
batches a classifier trains on.

`write_labelled_dataset` writes a prepared-dataset directory (tokenizer, meta.json, train/val shards of the texts
tokenized with the model's own tokenizer) so the ordinary training path opens it as it opens any dataset, plus
examples.json with every example's token ids and label index, which `LabelledLoader` serves.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scalelm.data.prepare import FORMAT_VERSION, META_FILE, token_dtype
from scalelm.usage import UsageError

EXAMPLES_FILE = "examples.json"


def read_labelled(path: str | Path) -> list[tuple[str, str]]:
    """[(text, label)] of a JSONL file; one line naming the first bad line, or a label set of one class."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--data {file} does not exist; pass a JSONL file with `text` and `label` fields")
    examples = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UsageError(f"{file} line {n} is not JSON; each line must be {{\"text\": ..., \"label\": ...}}") \
                from None
        for field in ("text", "label"):
            if not isinstance(record, dict) or field not in record:
                raise UsageError(f"{file} line {n} has no {field!r} field; each line needs `text` and `label`")
        if not isinstance(record["text"], str) or not record["text"]:
            raise UsageError(f"{file} line {n}: `text` must be a non-empty string")
        examples.append((record["text"], str(record["label"])))
    labels = {label for _, label in examples}
    if len(labels) < 2:
        raise UsageError(f"{file} has {len(examples)} example(s) with a single label {sorted(labels)}; a classifier "
                         f"needs at least two classes")
    return examples


def split_examples(examples: list[tuple[str, str]], val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded shuffle, the last `val_fraction` held out (at least one example each)."""
    if not 0 < val_fraction < 1:
        raise UsageError(f"--val-fraction {val_fraction} must be in (0, 1), e.g. 0.2")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(shuffled) - 1, max(1, round(len(shuffled) * val_fraction)))
    return shuffled[: len(shuffled) - n_val], shuffled[len(shuffled) - n_val:]


def write_labelled_dataset(directory: Path, tokenizer, train: list[tuple[str, str]], val: list[tuple[str, str]],
                           labels: list[str], seq_len: int) -> None:
    """A prepared-dataset directory of the examples (texts truncated to `seq_len` tokens) + examples.json."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    index = {label: i for i, label in enumerate(labels)}
    examples: dict[str, Any] = {"labels": labels}
    splits = {}
    for split, rows in (("train", train), ("val", val)):
        ids = [tokenizer.encode(text)[:seq_len] for text, _ in rows]
        examples[split] = [[row, index[label]] for row, (_, label) in zip(ids, rows)]
        data = np.concatenate([np.asarray(row, dtype=dtype) for row in ids]).tobytes()
        (directory / f"{split}.bin").write_bytes(data)
        splits[split] = {"file": f"{split}.bin", "tokens": len(data) // dtype.itemsize,
                         "chars": sum(len(text) for text, _ in rows), "sha256": hashlib.sha256(data).hexdigest()}
    tokenizer.save(directory)
    (directory / EXAMPLES_FILE).write_text(json.dumps(examples))
    meta = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name, "byte_order": "little", "documents": len(train) + len(val),
            "sources": ["labelled examples"], "splits": splits}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_examples(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / EXAMPLES_FILE).read_text())


def collate(rows: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T] token ids right-padded with 0 to the longest row; y [B, 2] = (label, index of the last token).
    Causal attention keeps each last token's state free of the padding after it."""
    width = max(len(ids) for ids, _ in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.zeros(len(rows), 2, dtype=torch.long)
    for i, (ids, label) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, 0], y[i, 1] = label, len(ids) - 1
    return x, y


class LabelledLoader:
    """Seeded epochs over the training examples; each step takes the next global batch, this data-parallel rank
    its slice. Its state is the step (as BatchLoader's), so a resumed run sees the batches it would have seen."""

    def __init__(self, rows: list[list], global_batch: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        self.rows, self.global_batch, self.seed = rows, global_batch, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.step = 0
        self._cached: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._cached[0] != epoch:
            order = list(range(len(self.rows)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._cached = (epoch, order)
        return self._cached[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        local = self.global_batch // self.dp_size
        start = self.step * self.global_batch + self.dp_rank * local
        picked = []
        for p in range(start, start + local):
            epoch, i = divmod(p, len(self.rows))
            picked.append(self.rows[self._order(epoch)[i]])
        self.step += 1
        return collate(picked)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
