"""Shared helpers for tests: run the CLI in-process and read what it wrote."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from scalelm.cli import main

MODEL_VARIANTS = {
    "llama-like": {},  # the tiny preset: grouped-query heads, RoPE, RMSNorm, SwiGLU, tied embeddings
    "gpt2-like": dict(mlp="gelu", pos="learned", norm="layernorm", bias=True, tie_embeddings=False, n_kv_head=None),
    "sinusoidal-mha": dict(pos="sinusoidal", n_kv_head=4),
}
"""Changes to the tiny preset that cover each model family: tests parametrize over them."""

TINY = ["--model.preset", "tiny", "--train.dtype", "fp32", "--train.global_batch", "8", "--train.seq_len", "32",
        "--train.sample_tokens", "0", "--metrics.progress", "false", "--optim.warmup_steps", "3",
        "--optim.name", "adamw", "--train.eval_every", "0"]


def train(out: Path, *extra: str) -> int:
    return main(["train", "--out", str(out), *TINY, *extra])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def run_multiprocess(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run for a command that starts several processes (torchrun, `scalelm train --nproc`), its output
    captured for the caller's assertion message. Run once: a launch that fails is a failure to fix."""
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
