"""Reading raw text: files, directories and JSONL, decoded and normalized the same way everywhere.

Every document comes out as (name, text) with "\\n" line endings, so a dataset prepared on Windows and one
prepared on Linux from the same files have the same tokens and the same sha256.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from scalelm.data.errors import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
"""What a directory source contributes (recursively, skipping hidden files and folders such as .git); a file
named directly is read whatever its suffix."""


def decode_text(raw: bytes, name: str = "<bytes>") -> str:
    """UTF-8 (a leading BOM dropped); Latin-1 as the fallback that never fails; line endings made "\\n"."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("%s is not valid UTF-8; reading it as Latin-1", name)
        text = raw.decode("latin-1")
    return normalize_newlines(text)


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def expand_sources(sources: Sequence[str | Path]) -> list[Path]:
    """Files in reading order: sources in the order given, each directory's files sorted by relative path."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise DataError("no sources given; pass text files, directories of .txt/.md/.jsonl, or .jsonl files")
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(
                (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            found = [p for p in found if not any(part.startswith(".") for part in p.relative_to(path).parts)]
            if not found:
                raise DataError(
                    f"directory {path} has no {'/'.join(TEXT_SUFFIXES)} files; point at one that does"
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"source {path} does not exist; check the path")
    return files


def read_documents(path: Path) -> list[tuple[str, str]]:
    """The documents of one file: the whole text, or one per line of a .jsonl file (its "text" field)."""
    raw = path.read_bytes()
    if b"\0" in raw[:1 << 16]:  # text never holds NUL bytes; images, archives and token shards do
        raise DataError(f"{path} looks like a binary file (it holds NUL bytes), not text; give text, Markdown or "
                        f"JSONL files")
    text = decode_text(raw, str(path))
    if path.suffix.lower() != ".jsonl":
        return [(str(path), text)]
    docs = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON ({e.msg}); write one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{where} has no string "text" field; write lines like {{"text": "..."}}')
        docs.append((where, normalize_newlines(record["text"])))
    return docs


def read_sources(sources: Sequence[str | Path]) -> list[tuple[str, str]]:
    """All documents of all sources, in reading order."""
    docs = [doc for path in expand_sources(sources) for doc in read_documents(path)]
    if not any(text for _, text in docs):
        names = ", ".join(str(s) for s in ([sources] if isinstance(sources, (str, Path)) else sources))
        raise DataError(f"sources {names} contain no text; give files with some text in them")
    return docs


def join_documents(docs: Sequence[tuple[str, str]]) -> str:
    """One string; a document that does not end with a newline gets one, so documents never run together."""
    return "".join(text if text.endswith("\n") else text + "\n" for _, text in docs if text)
