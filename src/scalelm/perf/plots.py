"""`scalelm plan --plot DIR`: memory breakdown of the top layouts and the pipeline timeline of the best.

matplotlib is optional (`pip install 'scalelm[plot]'`); it is imported here only.
"""

from __future__ import annotations

from pathlib import Path

from scalelm.perf.pipeline import timeline
from scalelm.perf.step import StepResult

PARTS = ("params", "grads", "optimizer", "activations", "logits", "buffers", "margin")


def plot_plan(results: list[StepResult], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{i}: {r.layout.short()}\nz{r.layout.zero} mb{r.layout.micro_batch} {r.layout.recompute}"
              for i, r in enumerate(results, 1)]
    bottom = [0.0] * len(results)
    for part in PARTS:
        vals = [r.memory_gib()[part] for r in results]
        ax.bar(labels, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("GiB per device")
    ax.set_title("memory breakdown of the top layouts")
    ax.legend(fontsize=7, ncol=4)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    mem_path = out / "memory_breakdown.png"
    fig.savefig(mem_path, dpi=120)
    plt.close(fig)

    best = results[0].layout
    p, m = best.pp, min(results[0].microbatches, 16)
    sched = "interleaved" if best.vpp > 1 else best.schedule
    blocks = timeline(sched, max(1, p), m, best.vpp)
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.4 * max(1, p)))
    for stage, start, dur, kind, mb in blocks:
        ax.broken_barh([(start, dur)], (stage - 0.4, 0.8), facecolors="tab:blue" if kind == "F" else "tab:orange",
                       edgecolor="white")
        ax.text(start + dur / 2, stage, str(mb), ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(max(1, p)))
    ax.set_yticklabels([f"stage {s}" for s in range(max(1, p))])
    ax.invert_yaxis()
    ax.set_xlabel("time (units of one forward)")
    ax.set_title(f"{sched} schedule, p={p}, m={m} (blue forward, orange backward)")
    fig.tight_layout()
    tl_path = out / "pipeline_timeline.png"
    fig.savefig(tl_path, dpi=120)
    plt.close(fig)
    return [str(mem_path), str(tl_path)]
