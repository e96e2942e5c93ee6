"""Prepare: text sources → a tokenizer, `train.bin`, `val.bin` and `meta.json` in one directory.

The validation split is the last `val_fraction` of the concatenated text, cut by characters before tokenizing,
so two runs with different tokenizers are evaluated on the same text. Shards are raw little-endian token ids
(uint16 when the vocabulary allows, else uint32) that `open_split` memory-maps. The whole corpus is held in
memory while preparing, which is fine up to a few GB of text. Everything is written to a temporary directory
beside `out` and renamed into place at the end, so an interrupted prepare never leaves half a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scalelm.data.errors import DataError
from scalelm.data.sources import join_documents, read_sources
from scalelm.data.tokenizer import BPETokenizer, CharTokenizer

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
TOKENIZERS = ("char", "bpe")
DEFAULT_BPE_VOCAB = 4096


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest shard dtype for this vocabulary; half the disk and page-cache traffic of uint32."""
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")


def prepare(
    sources: Sequence[str | Path],
    out: str | Path,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
) -> dict:
    """Tokenize `sources` into the dataset directory `out` and return its meta.json contents.

    `out` is replaced only if it is a previous prepared dataset (has meta.json) or empty; anything else raises
    DataError rather than delete files that were not ours.
    """
    check_options(tokenizer, vocab_size, val_fraction)
    if isinstance(sources, (str, Path)):
        sources = [sources]
    out = Path(out)
    check_out_dir(out)
    docs = read_sources(sources)
    tmp = temp_dir_beside(out)
    try:
        meta = write_dataset(
            docs,
            tmp,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            val_fraction=val_fraction,
            sources=[str(s) for s in sources],
        )
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def check_options(tokenizer: str, vocab_size: int | None, val_fraction: float) -> None:
    """Refuse bad options before any file is read; the expensive work comes after."""
    if tokenizer not in TOKENIZERS:
        raise DataError(f"tokenizer={tokenizer!r} is not known; use one of {', '.join(TOKENIZERS)}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be strictly between 0 and 1; 0.1 is usual")
    if tokenizer == "char" and vocab_size is not None:
        raise DataError(
            f"vocab_size={vocab_size} applies only to tokenizer='bpe'; a char vocabulary is the text's own "
            "characters, so leave vocab_size unset"
        )
    if tokenizer == "bpe" and vocab_size is not None:
        BPETokenizer.check_vocab_size(vocab_size)


def check_out_dir(out: Path) -> None:
    if out.is_file():
        raise DataError(f"output {out} is a file; give a directory path for the prepared dataset")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise DataError(
            f"output directory {out} is not empty and holds no {META_FILE}, so it is not a prepared dataset; "
            "choose another output directory or empty this one"
        )


def write_dataset(
    docs: Sequence[tuple[str, str]],
    directory: Path,
    *,
    tokenizer: str,
    vocab_size: int | None,
    val_fraction: float,
    sources: Sequence[str],
    extra_meta: dict | None = None,
) -> dict:
    """Write tokenizer, shards and (last) meta.json into the existing, empty `directory`; return the meta."""
    check_options(tokenizer, vocab_size, val_fraction)
    text = join_documents(docs)
    n_val = int(len(text) * val_fraction)
    if n_val == 0 or n_val == len(text):
        raise DataError(
            f"the text has only {len(text)} characters, too few to hold out val_fraction={val_fraction}; "
            "give more text or another val_fraction"
        )
    parts = {"train": text[: len(text) - n_val], "val": text[len(text) - n_val :]}
    # A char vocabulary comes from the whole text, since a character seen only in val must still encode; BPE
    # learns its merges from train alone, as it encodes any text byte by byte.
    if tokenizer == "char":
        tok = CharTokenizer.from_text(text)
    else:
        tok = BPETokenizer.train([parts["train"]], vocab_size or DEFAULT_BPE_VOCAB)
    dtype = token_dtype(tok.vocab_size)
    splits = {}
    for split, part in parts.items():
        data = tok.encode_array(part).astype(dtype).tobytes()
        (directory / f"{split}.bin").write_bytes(data)
        splits[split] = {
            "file": f"{split}.bin",
            "tokens": len(data) // dtype.itemsize,
            "chars": len(part),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    tok.save(directory)
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "byte_order": "little",
        "val_fraction": val_fraction,
        "documents": len(docs),
        "sources": list(sources),
        "splits": splits,
        **(extra_meta or {}),
    }
    (directory / META_FILE).write_text(
        json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return meta


def temp_dir_beside(out: Path) -> Path:
    """A fresh hidden directory next to `out` (same filesystem, so the final rename is atomic).

    Made with os.mkdir rather than tempfile.mkdtemp: mkdtemp's 0700 mode would follow the rename and make a
    shared dataset readable only by whoever prepared it; mkdir honours the umask like any other directory.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an old dataset there is set aside first and deleted after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def load_dataset_meta(path: str | Path) -> dict:
    """meta.json of the prepared dataset directory `path`, checked for a format this code reads."""
    path = Path(path)
    file = path / META_FILE
    if not file.is_file():
        raise DataError(
            f"{path} is not a prepared dataset (no {META_FILE}); run `scalelm prepare SOURCES --out {path}` first"
        )
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{file} is not valid JSON ({e}); re-run `scalelm prepare`") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict):
        raise DataError(f"{file} does not describe a prepared dataset (no splits); re-run `scalelm prepare`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{file} has format_version {meta.get('format_version')!r}, this scalelm reads {FORMAT_VERSION}; "
            "re-run `scalelm prepare`"
        )
    return meta


def open_split(path: str | Path, split: str, verify: bool = False) -> np.ndarray:
    """The token ids of one split, memory-mapped read-only (pages load on demand, shared between processes).
    The shard's size is checked against meta.json; with `verify`, its sha256 too (one full read)."""
    meta = load_dataset_meta(path)
    if split not in meta["splits"]:
        raise DataError(f"split {split!r} is not in {path}; use one of {', '.join(meta['splits'])}")
    info = meta["splits"][split]
    try:
        name, tokens, dtype = str(info["file"]), int(info["tokens"]), np.dtype(meta["dtype"]).newbyteorder("<")
        vocab = int(meta.get("vocab_size", 0))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{Path(path) / META_FILE} has a broken entry for split {split!r} ({e}); re-run "
                        f"`scalelm prepare`") from None
    if dtype.kind != "u" or vocab > np.iinfo(dtype).max + 1:
        raise DataError(f"{Path(path) / META_FILE}: a vocabulary of {vocab} tokens does not fit the "
                        f"shard dtype {dtype.name}; re-run `scalelm prepare` (it picks uint32 for large vocabularies)")
    if Path(name).name != name or name in ("", ".", ".."):
        raise DataError(f"{Path(path) / META_FILE} names the shard {name!r} outside the dataset directory; refusing")
    file = Path(path) / name
    expected = tokens * dtype.itemsize
    if not file.is_file():
        raise DataError(f"{file} is missing; re-run `scalelm prepare`")
    if file.stat().st_size != expected:
        raise DataError(f"{file} has {file.stat().st_size} bytes, meta.json says {expected} ({tokens} tokens of "
                        f"{dtype.name}): truncated or replaced; re-run `scalelm prepare`")
    if verify and "sha256" in info and _file_sha256(file) != info["sha256"]:
        raise DataError(f"{file} does not match its sha256 in meta.json: the shard changed after `scalelm prepare`; "
                        f"re-run it")
    if tokens == 0:  # mmap cannot map an empty file; the loader says what an empty split needs
        return np.zeros(0, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r", shape=(tokens,))


def _file_sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
