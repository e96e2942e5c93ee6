"""Durable checkpoint directories: what a kill, a power cut or a full disk can leave behind is never loaded.

A checkpoint is written into a temporary directory (`.tmp*`), every file is flushed to disk (fsync), and a
manifest of every file's size and sha256 is written last; then one rename publishes the directory and the parent
directory is fsynced so the rename itself survives a crash. Replacing or pruning a published checkpoint first
renames it out of the way (`.tmp*` again), so no step directory is ever half deleted either. On load the manifest
is checked before any byte is used: a truncated, bit-flipped or missing file, or a file name that would leave the
directory, makes the checkpoint "damaged", and the run falls back to the previous good one with a warning.
Temporaries are removed when a run starts. Directories from before manifests existed load unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp"
SAVE_PAUSE_ENV = "SCALELM_TEST_SAVE_PAUSE_S"
"""Test hook: seconds to sleep inside every checkpoint save, after the data files and before the manifest, so a
chaos test can kill a run in the middle of a write (bench/chaos.py)."""
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A missing, damaged or unreadable checkpoint, phrased for people."""


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (new names, renames). A no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pause_for_tests() -> None:
    pause = os.environ.get(SAVE_PAUSE_ENV)
    if pause:
        time.sleep(float(pause))


def write_manifest(directory: Path) -> None:
    """fsync every file of `directory`, then write the manifest (size and sha256 of each) and fsync it too."""
    pause_for_tests()
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            fsync_file(path)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    with open(directory / MANIFEST, "w") as f:
        json.dump({"version": 1, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(directory)


def safe_name(name: str) -> bool:
    """A plain file name inside the checkpoint directory: no separator, no `..`, not absolute."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def check(directory: Path, hashes: bool = True) -> str | None:
    """None if `directory` matches its manifest (or predates manifests), else what is wrong, in a few words."""
    file = directory / MANIFEST
    if not file.is_file():
        return None
    try:
        files = json.loads(file.read_text())["files"]
        entries = [(name, int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name, size, digest in entries:
        if not safe_name(name):
            return f"{MANIFEST} names {name!r}, outside the checkpoint directory"
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if hashes and _sha256(path) != digest:
            return f"{name} does not match its sha256 in the manifest"
    return None


def verify(directory: Path, hashes: bool = True) -> None:
    """Raise CheckpointError naming the damage if `directory` does not match its manifest."""
    problem = check(directory, hashes)
    if problem is not None:
        raise CheckpointError(f"checkpoint {directory} is damaged: {problem}; delete it to use an older one")


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final` (set aside and replacing one of the same name) and persist the rename."""
    old = None
    if final.exists():
        old = final.with_name(f"{TEMP_PREFIX}_replaced_{final.name}_{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard(directory: Path) -> None:
    """Delete a published checkpoint: renamed to a temporary first, so a kill mid-delete leaves no half of it."""
    aside = directory.with_name(f"{TEMP_PREFIX}_pruned_{directory.name}_{os.getpid()}")
    try:
        os.rename(directory, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def remove_temporaries(root: Path) -> list[Path]:
    """Delete what killed saves, replacements and prunes left in `root`; returns what was removed."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(TEMP_PREFIX)]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found
