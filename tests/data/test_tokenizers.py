import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelm.data import BPETokenizer, CharTokenizer, DataError, load_tokenizer

SAMPLE = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([SAMPLE], vocab_size=300)


def test_char_round_trip_and_vocab():
    text = "héllo wörld\n🙂 tab\there"
    tok = CharTokenizer.from_text(text)
    assert tok.name == "char"
    assert tok.vocab_size == len(set(text))
    assert tok.chars == sorted(set(text))
    ids = tok.encode(text)
    assert all(type(i) is int and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids)) == text
    assert tok.encode("") == []


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1))
def test_char_round_trip_on_its_alphabet(text):
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_character_is_a_clear_error():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"outside this char vocabulary: \['z'\]"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="outside this char vocabulary"):
        tok.encode("a\U0010ffff")  # above every code point in the table
    with pytest.raises(ValueError, match="token id 3 is outside"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="token id -1 is outside"):
        tok.decode([-1])


def test_char_save_and_load(tmp_path):
    tok = CharTokenizer.from_text("hello, world")
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == {"kind": "char", "chars": tok.chars}
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, CharTokenizer)
    assert loaded.chars == tok.chars
    assert loaded.encode("world") == tok.encode("world")


def test_bpe_round_trips_any_text(bpe):
    assert bpe.name == "bpe"
    assert 257 <= bpe.vocab_size <= 300
    for text in ["", SAMPLE, "  leading spaces", "unseen: 世界 🙂 ÿ\x00\r\n\t end "]:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
    assert len(bpe.encode(SAMPLE)) < len(SAMPLE) / 2  # the merges did learn something


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_bpe_round_trip_property(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_encode_array_matches_encode_on_long_text(bpe):
    """encode_array splits long text into chunks; the split points must not change a single token."""
    pieces = [
        "word\nWord",
        "x \nB",
        "\n  indented",
        "\n\n\nblank",
        "trailing   \n",
        "'tis\n's",
        "a.\n.b",
        "🙂\n🙂",
    ]
    text = "".join(pieces[i % len(pieces)] + " " * (i % 3) for i in range(4000))
    assert len(text) > 4 * 4096
    assert bpe.encode_array(text).tolist() == bpe.encode(text)


def test_bpe_save_and_load(tmp_path, bpe):
    from tokenizers import Tokenizer

    bpe.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_kind.json").read_text()) == {"kind": "bpe"}
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(SAMPLE).ids == bpe.encode(SAMPLE)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.vocab_size == bpe.vocab_size
    assert loaded.encode(SAMPLE) == bpe.encode(SAMPLE)


@pytest.mark.parametrize("vocab_size", [0, 100, 256])
def test_bpe_vocab_too_small(vocab_size):
    with pytest.raises(DataError, match="too small for byte-level BPE"):
        BPETokenizer.train([SAMPLE], vocab_size)


def test_load_tokenizer_needs_a_tokenizer(tmp_path):
    with pytest.raises(DataError, match="scalelm prepare"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match="not a scalelm tokenizer"):
        load_tokenizer(tmp_path)
