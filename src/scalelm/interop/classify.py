"""Sequence classification on a pretrained scalelm or Hugging Face model: the LM head is replaced by a linear head
over the classes, read at each text's last token (after the final norm), and the whole model trains end to end
through the ordinary training path (`train(cfg, prepare_model=..., trainer_class=ClassifyTrainer)`): the same
optimizers, schedule, checkpoints and resume; accuracy on a held-out split is logged with every evaluation.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scalelm.config import Config, ConfigError, build_config, parse_overrides
from scalelm.data import load_tokenizer
from scalelm.interop.classify_data import (
    LabelledLoader,
    collate,
    read_examples,
    read_labelled,
    split_examples,
    write_labelled_dataset,
)
from scalelm.model.config import ModelConfig
from scalelm.model.gpt import GPT
from scalelm.train.checkpoint import CheckpointError, load_weights, resolve_checkpoint
from scalelm.train.init_from import is_hf_dir, with_source_model
from scalelm.train.metrics import now
from scalelm.train.run import train
from scalelm.train.trainer import Trainer
from scalelm.usage import UsageError

LABELS_FILE = "labels.json"
EVAL_CHUNK = 32


def add_head(model: nn.Module, cfg: Config, n_classes: int) -> None:
    """Replace the LM head by a fresh linear head over `n_classes` (a prepare_model hook; a tied head is untied)."""
    head = nn.Linear(cfg.model.d_model, n_classes, device=model.tok_embeddings.weight.device)
    nn.init.normal_(head.weight, std=cfg.model.init_std)
    nn.init.zeros_(head.bias)
    model.output = head


def last_token_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Class logits [B, C] at each row's last token (y[:, 1])."""
    logits = model(x)
    return logits[torch.arange(x.shape[0], device=x.device), y[:, 1]].float()


class ClassifyTrainer(Trainer):
    """The trainer with labelled batches, a cross-entropy over classes and accuracy in every evaluation."""

    def __init__(self, cfg: Config, *args: Any, **kwargs: Any):
        super().__init__(cfg, *args, **kwargs)
        examples = read_examples(cfg.data.path)
        dp_rank = self.parallel.coords["dp"] if self.parallel is not None else 0
        self.loader = LabelledLoader(examples["train"], cfg.train.global_batch, cfg.seed, dp_rank,
                                     self.loader.dp_size)
        self.val_examples = examples["val"]
        self.last_accuracy: float | None = None

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast(self.device):
            logits = last_token_logits(self.model, x, y)
        return F.cross_entropy(logits, y[:, 0], reduction="sum") / self.cfg.train.global_batch

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the held-out examples; their accuracy is kept in last_accuracy."""
        self.model.eval()
        loss, correct = 0.0, 0
        for i in range(0, len(self.val_examples), EVAL_CHUNK):
            x, y = (t.to(self.device) for t in collate(self.val_examples[i:i + EVAL_CHUNK]))
            with self.precision.autocast(self.device):
                logits = last_token_logits(self.model, x, y)
            loss += F.cross_entropy(logits, y[:, 0], reduction="sum").item()
            correct += int((logits.argmax(-1) == y[:, 0]).sum())
        self.model.train()
        if self.parallel is not None:
            self.parallel.reshard()
        self.last_accuracy = correct / len(self.val_examples)
        return loss / len(self.val_examples)

    def eval_and_log(self) -> float:
        start = now()
        val_loss = self.evaluate()
        self.last_val_loss = val_loss
        self.logger.log({"step": self.step, "val_loss": val_loss, "val_accuracy": self.last_accuracy,
                         "eval_s": now() - start})
        self.logger.print(f"step {self.step}: val loss {val_loss:.4f}, accuracy {self.last_accuracy:.3f} on "
                          f"{len(self.val_examples)} held-out examples")
        return val_loss

    def fit(self) -> dict[str, Any]:
        end = super().fit()
        return dict(end, accuracy=self.last_accuracy, val_examples=len(self.val_examples))


def source_tokenizer(path: str | Path):
    """The tokenizer of an --init-from source (a run, a checkpoint or an HF directory)."""
    if is_hf_dir(path):
        from scalelm.interop.hf_tokenizer import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(path)
    else:
        checkpoint = resolve_checkpoint(path)
        found = [c for c in (checkpoint / "tokenizer", checkpoint.parent.parent / "tokenizer")
                 if (c / "tokenizer.json").is_file()]
        tokenizer = load_tokenizer(found[0]) if found else None
    if tokenizer is None:
        raise UsageError(f"--init-from {path} has no tokenizer; classification encodes text with the model's own")
    return tokenizer


def finetune_classify(data: str | Path, argv: list[str], val_fraction: float = 0.2) -> dict[str, Any]:
    """Train a classifier per `argv` (`scalelm train` flags with --init-from) on the labelled JSONL `data`;
    returns the end record with `accuracy` on the held-out split."""
    overrides = parse_overrides(argv)
    from scalelm.config import load_toml

    file_values = load_toml(overrides.pop("config")) if "config" in overrides else {}
    cfg = build_config(with_source_model(file_values, overrides), overrides)
    if not cfg.init_from:
        raise UsageError("finetune-classify needs --init-from RUN_OR_HF_DIR (the pretrained model to start from)")
    if cfg.lora.rank:
        raise ConfigError("finetune-classify trains the whole model; drop --lora.rank")
    examples = read_labelled(data)
    labels = sorted({label for _, label in examples})
    train_rows, val_rows = split_examples(examples, val_fraction, cfg.seed)
    tokenizer = source_tokenizer(cfg.init_from)
    run_dir = Path(cfg.out)
    cfg.data.path = str(run_dir / "data")
    cfg.train.sample_tokens = 0  # the head predicts classes, not tokens
    write_labelled_dataset(Path(cfg.data.path), tokenizer, train_rows, val_rows, labels, cfg.train.seq_len)
    (run_dir / LABELS_FILE).write_text(json.dumps({"labels": labels}) + "\n")
    end = train(cfg, prepare_model=partial(add_head, n_classes=len(labels)), trainer_class=ClassifyTrainer)
    return dict(end, out=str(run_dir))


def load_classifier(path: str | Path) -> tuple[nn.Module, Any, list[str]]:
    """(model in eval mode, tokenizer, label names) of a finetune-classify run or checkpoint."""
    checkpoint = resolve_checkpoint(path)
    labels_file = next((c / LABELS_FILE for c in (checkpoint, checkpoint.parent.parent)
                        if (c / LABELS_FILE).is_file()), None)
    if labels_file is None:
        raise CheckpointError(f"{path} is not a classifier (no {LABELS_FILE}); train one with "
                              f"`scalelm finetune-classify`")
    labels = json.loads(labels_file.read_text())["labels"]
    cfg = ModelConfig.from_dict(json.loads((checkpoint / "model.json").read_text()))
    with torch.device("meta"):
        model = GPT(cfg)
    model.output = nn.Linear(cfg.d_model, len(labels), device="meta")
    model.to_empty(device="cpu")
    model.init_buffers("cpu")
    load_weights(model, checkpoint / "model.safetensors")
    from scalelm.infer.load import tokenizer_dir

    return model.eval(), load_tokenizer(tokenizer_dir(checkpoint)), labels


@torch.no_grad()
def predict(model: nn.Module, tokenizer, labels: list[str], text: str) -> tuple[str, float]:
    """(label, its probability) for one text (truncated to the model's context)."""
    ids = tokenizer.encode(text)[: model.cfg.max_seq_len]
    if not ids:
        raise UsageError("--text is empty; give some text to classify")
    x, y = collate([[ids, 0]])
    probs = last_token_logits(model, x, y).softmax(-1)[0]
    best = int(probs.argmax())
    return labels[best], float(probs[best])
