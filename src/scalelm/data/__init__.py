"""Data: tokenizers, prepare (text → token shards), the rank-aware batch loader, and the bundled corpus.

Sits on the floor beside `scalelm.model`: it imports neither `parallel`, `train`, `infer` nor `cli`.
"""

from scalelm.data.corpus import bundled_texts, default_dataset
from scalelm.data.errors import DataError
from scalelm.data.loader import BatchLoader, eval_batches
from scalelm.data.prepare import load_dataset_meta, open_split, prepare
from scalelm.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

__all__ = [
    "BPETokenizer",
    "BatchLoader",
    "CharTokenizer",
    "DataError",
    "bundled_texts",
    "default_dataset",
    "eval_batches",
    "load_dataset_meta",
    "load_tokenizer",
    "open_split",
    "prepare",
]
