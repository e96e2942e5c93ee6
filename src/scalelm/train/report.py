"""`scalelm report RUN_DIR`: PNG plots of metrics.jsonl (needs the [plot] extra: matplotlib)."""

from __future__ import annotations

from pathlib import Path

from scalelm.config import ConfigError
from scalelm.train.metrics import read_metrics


def write_report(run_dir: Path) -> list[Path]:
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"no metrics.jsonl in {str(run_dir)!r}; pass a run directory written by `scalelm train`")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'scalelm[plot]'") from None
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r and r.get("loss") is not None]
    evals = [r for r in records if "val_loss" in r and r.get("event") is None]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(run_dir / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{run_dir.name}: throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(run_dir / "throughput.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
