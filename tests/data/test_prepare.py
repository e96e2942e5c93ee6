import hashlib
import json

import numpy as np
import pytest

from scalelm.data import DataError, load_dataset_meta, load_tokenizer, open_split, prepare
from scalelm.data.prepare import token_dtype

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 30


def decoded(out, split):
    return load_tokenizer(out).decode(open_split(out, split))


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_prepare_text_file(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text(TEXT)
    out = tmp_path / "ds"
    meta = prepare([src], out, val_fraction=0.25)

    assert meta == load_dataset_meta(out)
    assert meta["format_version"] == 1
    assert meta["tokenizer"] == "char"
    assert meta["vocab_size"] == len(set(TEXT))
    assert meta["dtype"] == "uint16"
    assert meta["sources"] == [str(src)]
    n_val = int(len(TEXT) * 0.25)
    assert meta["splits"]["val"]["chars"] == n_val
    assert meta["splits"]["train"]["chars"] == len(TEXT) - n_val
    # The val split is the tail of the text, cut by characters.
    assert decoded(out, "val") == TEXT[-n_val:]
    assert decoded(out, "train") == TEXT[:-n_val]
    for split in ("train", "val"):
        info = meta["splits"][split]
        data = (out / info["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
        assert info["tokens"] == info["chars"] == len(data) // 2
        tokens = open_split(out, split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and len(tokens) == info["tokens"]
    assert leftovers(tmp_path) == []


def test_prepare_directory_and_jsonl_in_sorted_order(tmp_path):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    (src / "b.md").write_text("# bee\n")
    (src / "a.txt").write_text("ay")  # no trailing newline: one is added so documents never run together
    (src / "sub" / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two\\r\\nlines", "id": 7}\n')
    (src / "skipped.csv").write_text("not,text\n")
    (src / ".git").mkdir()
    (src / ".git" / "notes.md").write_text("hidden folders are skipped\n")
    out = tmp_path / "ds"
    meta = prepare([src], out, val_fraction=0.5)

    expected = "ay\n# bee\none\ntwo\nlines\n"
    assert decoded(out, "train") + decoded(out, "val") == expected
    assert meta["documents"] == 4
    assert meta["splits"]["val"]["chars"] == len(expected) // 2


def test_single_source_path(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    meta = prepare(str(tmp_path / "a.txt"), tmp_path / "ds")
    assert meta["sources"] == [str(tmp_path / "a.txt")]


def test_bom_crlf_and_latin1_are_normalized(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\n")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 cr\xe8me\n")
    out = tmp_path / "ds"
    prepare([tmp_path / "bom.txt", tmp_path / "latin.txt"], out, val_fraction=0.5)
    assert decoded(out, "train") + decoded(out, "val") == "one\ntwo\nthree\ncafé crème\n"


def test_prepare_bpe(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text(TEXT)
    meta = prepare([src], tmp_path / "ds", tokenizer="bpe", vocab_size=300)
    assert meta["tokenizer"] == "bpe" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] <= 300
    assert meta["splits"]["train"]["tokens"] < meta["splits"]["train"]["chars"]
    assert (tmp_path / "ds" / "tokenizer_kind.json").is_file()
    assert decoded(tmp_path / "ds", "train") + decoded(tmp_path / "ds", "val") == TEXT


def test_dtype_follows_vocab_size(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    alphabet = "".join(chr(0x10000 + i) for i in range(70_000))  # 70k distinct characters, so 70k char tokens
    (tmp_path / "wide.txt").write_text(alphabet * 2, encoding="utf-8")
    meta = prepare([tmp_path / "wide.txt"], tmp_path / "ds")
    assert meta["vocab_size"] == 70_001 and meta["dtype"] == "uint32"
    assert open_split(tmp_path / "ds", "val").dtype == np.uint32
    assert decoded(tmp_path / "ds", "val") == (alphabet * 2 + "\n")[-meta["splits"]["val"]["chars"] :]


def test_overwrites_only_a_prepared_dataset(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text(TEXT)
    out = tmp_path / "ds"
    out.mkdir()  # an empty directory is fine
    prepare([src], out)
    src.write_text(TEXT.upper())
    meta = prepare([src], out)  # a previous dataset is replaced
    assert decoded(out, "val") == TEXT.upper()[-meta["splits"]["val"]["chars"] :]
    assert leftovers(tmp_path) == []

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare([src], foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_failure_leaves_previous_dataset_intact(tmp_path, monkeypatch):
    src = tmp_path / "input.txt"
    src.write_text(TEXT)
    out = tmp_path / "ds"
    before = prepare([src], out)

    def broken_save(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr("scalelm.data.tokenizer.CharTokenizer.save", broken_save)
    src.write_text("something else entirely\n" * 10)
    with pytest.raises(OSError, match="disk full"):
        prepare([src], out)
    assert load_dataset_meta(out) == before
    assert decoded(out, "val") == TEXT[-before["splits"]["val"]["chars"] :]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("files", "kwargs", "message"),
    [
        ({}, {}, "does not exist"),
        ({"a.txt": ""}, {}, "contain no text"),
        ({"a.jsonl": '{"text": "ok"}\n{"body": "no text"}\n'}, {}, r'a.jsonl:2 has no string "text" field'),
        ({"a.jsonl": "{not json\n"}, {}, "a.jsonl:1 is not valid JSON"),
        ({"a.txt": TEXT}, {"val_fraction": 0.0}, "strictly between 0 and 1"),
        ({"a.txt": TEXT}, {"val_fraction": 1.0}, "strictly between 0 and 1"),
        ({"a.txt": TEXT}, {"tokenizer": "bpe", "vocab_size": 100}, "too small for byte-level BPE"),
        ({"a.txt": TEXT}, {"vocab_size": 500}, "only to tokenizer='bpe'"),
        ({"a.txt": TEXT}, {"tokenizer": "word"}, "use one of char, bpe"),
        ({"a.txt": "hi"}, {}, "too few to hold out val_fraction"),
    ],
)
def test_bad_input_raises_data_error(tmp_path, files, kwargs, message):
    src = tmp_path / "src"
    src.mkdir()
    for name, content in files.items():
        (src / name).write_text(content)
    paths = [src / name for name in files] or [src / "missing.txt"]
    with pytest.raises(DataError, match=message) as err:
        prepare(paths, tmp_path / "ds", **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ds").exists()
    assert leftovers(tmp_path) == []


def test_empty_directory_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no .txt/.md/.jsonl files"):
        prepare([tmp_path / "empty"], tmp_path / "ds")


def test_open_split_checks_the_dataset(tmp_path):
    with pytest.raises(DataError, match="run `scalelm prepare"):
        open_split(tmp_path, "train")
    src = tmp_path / "input.txt"
    src.write_text(TEXT)
    out = tmp_path / "ds"
    prepare([src], out)
    with pytest.raises(DataError, match="use one of train, val"):
        open_split(out, "test")
    with open(out / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="re-run `scalelm prepare`"):
        open_split(out, "val")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99"):
        load_dataset_meta(out)
