"""Tokenizers: characters (the Shakespeare default) and byte-level BPE trained locally.

Both share one small interface — `encode`, `decode`, `vocab_size`, `name`, `save` — so the rest of scalelm never
asks which one it holds. `encode_array` is the bulk path `prepare` uses on whole corpora. A saved tokenizer is a
directory with `tokenizer.json`: for char that file is ours ({"kind": "char", "chars": [...]}); for BPE it is the
plain Hugging Face file (loadable by `tokenizers` and `transformers` as is), and `tokenizer_kind.json` marks it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from scalelm.data.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
KIND_FILE = "tokenizer_kind.json"
MIN_BPE_VOCAB = 257
"""Byte-level BPE starts from the 256 byte tokens; one merge more is the smallest vocabulary worth training."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def encode_array(self, text: str) -> np.ndarray: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def save(self, directory: str | Path) -> None: ...


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters of the training text."""

    name = "char"

    def __init__(self, chars: Sequence[str]):
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise DataError(
                "CharTokenizer needs distinct single characters in sorted order; build it from_text()"
            )
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        # A dense code point -> id table (entry -1 = unknown; the last entry catches every larger code point):
        # encoding is then one vectorized gather instead of a dict lookup per character. At most 4.4 MB even for
        # an alphabet reaching U+10FFFF.
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._lut = np.full(int(codes.max(initial=0)) + 2, -1, dtype=np.int32)
        self._lut[codes] = np.arange(self.vocab_size, dtype=np.int32)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise DataError("cannot build a character vocabulary from empty text; give it some text")
        return cls(sorted(set(text)))

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = self._lut.take(np.minimum(codes, len(self._lut) - 1))
        unknown = ids < 0
        if unknown.any():
            missing = sorted({chr(c) for c in codes[unknown]})
            raise ValueError(
                f"text has {len(missing)} character(s) outside this char vocabulary: {missing[:10]!r}; "
                "remove them, or prepare the dataset from text that has them (or with tokenizer='bpe')"
            )
        return ids.astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        ids = _checked_ids(ids, self.vocab_size, "char")
        return "".join([self.chars[i] for i in ids])

    def save(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        payload = {"kind": "char", "chars": self.chars}
        (path / TOKENIZER_FILE).write_text(json.dumps(payload, ensure_ascii=False) + "\n", encoding="utf-8")


def _checked_ids(ids: Sequence[int], vocab_size: int, kind: str) -> list[int]:
    """ids as plain ints (lists, arrays and CPU tensors alike), refusing any outside [0, vocab_size)."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise ValueError(f"token id {int(bad[0])} is outside the {kind} vocabulary [0, {vocab_size})")
    return arr.tolist()


# Splitting long text before "\S" after "\S\n" leaves byte-level pre-tokenization unchanged (no pre-token spans
# such a newline), so the chunks can be encoded in parallel and concatenated to exactly what one call gives.
_SAFE_SPLIT = re.compile(r"(?<=\S\n)(?=\S)")
_CHUNK_CHARS = 4096


def _chunks(text: str, size: int = _CHUNK_CHARS) -> list[str]:
    out, start = [], 0
    while start + size < len(text):
        m = _SAFE_SPLIT.search(text, start + size)
        if m is None:
            break
        out.append(text[start : m.start()])
        start = m.start()
    out.append(text[start:])
    return out


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) trained with Hugging Face `tokenizers`; encodes any text."""

    name = "bpe"

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        cls.check_vocab_size(vocab_size)
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any text round-trips
            special_tokens=[],
            show_progress=False,
        )
        # Train on the same safe chunks encode_array uses: parallel, and the same pre-tokens as the whole text.
        tok.train_from_iterator((chunk for text in texts for chunk in _chunks(text)), trainer=trainer)
        return cls(tok)

    @staticmethod
    def check_vocab_size(vocab_size: int) -> None:
        if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
            raise DataError(
                f"vocab_size={vocab_size} is too small for byte-level BPE: it needs {MIN_BPE_VOCAB - 1} byte "
                f"tokens plus merges; use at least {MIN_BPE_VOCAB} (e.g. 4096)"
            )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        # encode_batch runs the chunks in parallel in Rust threads, where one long encode() would use one core.
        encodings = self._tok.encode_batch(_chunks(text))
        parts = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(_checked_ids(ids, self.vocab_size, "BPE"), skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / TOKENIZER_FILE))
        (path / KIND_FILE).write_text(json.dumps({"kind": "bpe"}) + "\n", encoding="utf-8")


def load_tokenizer(directory: str | Path) -> CharTokenizer | BPETokenizer:
    """The tokenizer saved in `directory` (a prepared dataset or a run directory), whichever kind it is."""
    path = Path(directory)
    file = path / TOKENIZER_FILE
    if not file.is_file():
        raise DataError(f"no {TOKENIZER_FILE} in {path}; point at a prepared dataset (run `scalelm prepare`)")
    if (path / KIND_FILE).is_file():
        kind = json.loads((path / KIND_FILE).read_text(encoding="utf-8")).get("kind")
        if kind != "bpe":
            raise DataError(
                f"{path / KIND_FILE} names kind {kind!r}; expected 'bpe' — re-run `scalelm prepare`"
            )
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_file(str(file)))
    payload = json.loads(file.read_text(encoding="utf-8"))
    if payload.get("kind") != "char":
        raise DataError(f"{file} is not a scalelm tokenizer (no kind marker); re-run `scalelm prepare`")
    return CharTokenizer(payload["chars"])
