"""scalelm tokenizers as Hugging Face `PreTrainedTokenizerFast` files, and back.

The char tokenizer becomes a `tokenizers` WordLevel model over its characters, split one character per token and
joined back with the Fuse decoder, so `AutoTokenizer` encodes text to the same ids; the BPE tokenizer already is a
`tokenizers` file. Import reads a directory's tokenizer.json: our char layout comes back as a CharTokenizer,
anything else is used as the `tokenizers` object it is (scalelm's BPETokenizer wraps any such object).
"""

from __future__ import annotations

import json
from pathlib import Path

from scalelm.data.tokenizer import BPETokenizer, CharTokenizer

CONFIG_FILE = "tokenizer_config.json"


def to_tokenizers(tok: CharTokenizer | BPETokenizer):
    """The `tokenizers.Tokenizer` that encodes text as `tok` does."""
    if isinstance(tok, BPETokenizer):
        return tok._tok
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel({c: i for i, c in enumerate(tok.chars)}, unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    hf.decoder = decoders.Fuse()  # ids back to text without separators
    return hf


def save_hf_tokenizer(tok: CharTokenizer | BPETokenizer, out: str | Path, max_len: int) -> None:
    """tokenizer.json + tokenizer_config.json (+ special tokens, where there are any) in `out`, written by
    transformers; the config names `PreTrainedTokenizerFast`, which every transformers >= 4.46 loads."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=to_tokenizers(tok), model_max_length=max_len)
    fast.save_pretrained(str(out))
    config_file = Path(out) / CONFIG_FILE
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_hf_tokenizer(hf_dir: str | Path) -> CharTokenizer | BPETokenizer | None:
    """The tokenizer of an HF directory as a scalelm tokenizer; None when the directory has none. A directory with
    slow-tokenizer files only (vocab.json + merges.txt, ...) is converted by transformers."""
    from tokenizers import Tokenizer

    file = Path(hf_dir) / "tokenizer.json"
    if file.is_file():
        hf = Tokenizer.from_file(str(file))
    else:
        if not any((Path(hf_dir) / name).is_file() for name in ("vocab.json", "tokenizer.model", CONFIG_FILE)):
            return None
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(str(hf_dir))
        if not hasattr(fast, "backend_tokenizer"):
            return None
        hf = fast.backend_tokenizer
    spec = json.loads(hf.to_str())
    vocab = spec["model"].get("vocab") if spec["model"].get("type") == "WordLevel" else None
    if isinstance(vocab, dict) and not spec.get("added_tokens") and all(len(c) == 1 for c in vocab):
        chars = sorted(vocab, key=vocab.get)
        if chars == sorted(chars) and [vocab[c] for c in chars] == list(range(len(chars))):
            return CharTokenizer(chars)
    return BPETokenizer(hf)
