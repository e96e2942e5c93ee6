"""`scalelm eval`: a checkpoint's loss on a dataset's validation split, measured as the trainer measures it.

The run's own config.toml (next to its checkpoints) gives the sequence length, the number of evaluation batches,
the batch the windows are forwarded in and the precision, so the numbers are the ones the trainer logged for the
same weights and data; another dataset (`data`) is measured the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from scalelm.config import build_config, load_toml
from scalelm.data import default_dataset, eval_batches, load_dataset_meta, open_split
from scalelm.infer.generate import GenerationError
from scalelm.infer.load import load_any_model
from scalelm.train.checkpoint import resolve_checkpoint
from scalelm.train.precision import resolve_precision
from scalelm.train.trainer import LN2, eval_rows


@dataclass
class EvalResult:
    val_loss: float
    perplexity: float
    bits_per_token: float
    tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def run_dir_of(checkpoint: Path) -> Path:
    """RUN for RUN/checkpoints/step_N; the checkpoint itself for a checkpoint kept elsewhere."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


@torch.no_grad()
def evaluate_checkpoint(path: str | Path, data: str | Path | None = None, device: str = "cpu") -> EvalResult:
    """Mean validation loss of the model at `path` (a run directory or a checkpoint) on `data` (a prepared
    dataset; default: the run's own), over the run's fixed evaluation windows."""
    checkpoint = resolve_checkpoint(path)
    config_file = run_dir_of(checkpoint) / "config.toml"
    cfg = build_config(load_toml(config_file) if config_file.is_file() else {})
    model = load_any_model(checkpoint, device=device)
    data_dir = Path(data) if data else Path(cfg.data.path) if cfg.data.path else default_dataset()
    vocab = load_dataset_meta(data_dir).get("vocab_size", 0)
    if vocab > model.cfg.vocab_size:
        raise GenerationError(f"the dataset {data_dir} has a vocabulary of {vocab} tokens but the model only "
                              f"{model.cfg.vocab_size}: evaluate on data prepared with the run's tokenizer")
    seq_len = min(cfg.train.seq_len, model.cfg.max_seq_len)
    precision = resolve_precision(cfg.train.dtype, torch.device(device))
    rows = eval_rows(cfg.train.global_batch)  # the trainer's windows, forwarded as it forwards them
    total = 0.0
    for x, y in eval_batches(open_split(data_dir, "val"), seq_len, rows, cfg.train.eval_batches):
        with precision.autocast(torch.device(device)):
            logits = model(x.to(device))
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item()
    loss = total / cfg.train.eval_batches
    return EvalResult(loss, math.exp(min(loss, 50.0)), loss / LN2, cfg.train.eval_batches * rows * seq_len)
