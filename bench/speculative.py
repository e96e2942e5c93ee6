"""Speculative decoding against plain cached decoding of the same target: tokens/s, acceptance, speed-up.

    python bench/speculative.py --work runs/spec --k 2 4 6 --min-confidence 0 0.4 --repeats 3
    python bench/speculative.py --target RUN --draft RUN --k 2 4 8 --device cuda

With no runs given, the pair is trained first in --work DIR (kept and reused; default a temporary directory), with
these commands (deterministic: a fixed step count, no time budget):

    scalelm train --out DIR/target --model.preset shakespeare-char --model.n_layer 6 --train.steps 300 \\
        --train.seq_len 256 --train.global_batch 4 --train.threads 1 --train.eval_every 0 --train.sample_tokens 0
    scalelm distill --teacher DIR/target --student shakespeare-char --model.n_layer 1 --alpha 0.9 \\
        --temperature 1 --out DIR/draft --train.steps 300 --train.seq_len 256 --train.global_batch 4 \\
        --train.threads 1 --train.eval_every 0 --train.sample_tokens 0

The target: 6 layers, d_model 256 (5.1M parameters); the draft: 1 layer, d_model 256 (0.9M, 5.8× smaller),
distilled from the target on the same bundled Shakespeare (--train-steps changes both step counts).

20 prompts (passages of 5 to 100 characters from the ends of the bundled works) are continued greedily by the
target alone (`Generator`, KV cache) and by every speculative variant (each k with each --min-confidence), all
variants in turn per prompt, for --repeats passes, so a change of the shared machine's speed hits them all. Per pass
a variant's tokens/s is its tokens over its time on all prompts and its speed-up is the plain time over its own in
that pass; the table shows medians over the passes. Acceptance and tokens per target forward are totals. Greedy
outputs must be identical to the target alone (counted, exit 1 if not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scalelm.data.corpus import bundled_texts
from scalelm.infer.generate import Generator
from scalelm.infer.load import load_for_inference
from scalelm.infer.sampling import Sampling
from scalelm.infer.speculative import SpeculativeDecoder

COMMON = ["--train.seq_len", "256", "--train.global_batch", "4", "--train.threads", "1", "--train.eval_every", "0",
          "--train.sample_tokens", "0", "--metrics.progress", "false"]
TARGET = ["train", "--model.preset", "shakespeare-char", "--model.n_layer", "6"]
DRAFT = ["distill", "--student", "shakespeare-char", "--model.n_layer", "1", "--alpha", "0.9", "--temperature", "1"]


def train(out: Path, command: list[str], steps: int, device: str) -> None:
    if (out / "checkpoints").is_dir():
        print(f"reusing {out}", flush=True)
        return
    cmd = [sys.executable, "-m", "scalelm", *command, "--out", str(out), "--train.steps", str(steps), *COMMON,
           "--device", device]
    print(f"training {out.name}: scalelm {' '.join(cmd[3:])}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")


def prompts(n: int) -> list[str]:
    """n passages of 5, 10, ... characters, each from the last tenth of a different bundled work (line starts)."""
    texts = [text for _, text in bundled_texts()]
    out = []
    for i in range(n):
        text = texts[i % len(texts)]
        tail = text[int(len(text) * 0.9):]
        start = tail.find("\n", (37 * i) % max(1, len(tail) // 2)) + 1
        out.append(tail[start:start + 5 * (i + 1)])
    return out


def params(model) -> str:
    cfg = model.cfg
    return f"{model.num_params() / 1e6:.2f}M params, {cfg.n_layer} layers, d_model {cfg.d_model}"


def timed(fn, *args, **kwargs):
    """(fn's result, seconds it took), the device idle at both ends."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


class Tally:
    """One variant's seconds and tokens per pass, and its totals of the speculative counters."""

    def __init__(self, passes: int):
        self.seconds, self.tokens = [0.0] * passes, [0] * passes
        self.accepted = self.proposed = self.new_tokens = self.target_forwards = self.same = self.runs = 0

    def add(self, rep: int, seconds: float, tokens: int, stats=None, same: bool = True) -> None:
        self.seconds[rep] += seconds
        self.tokens[rep] += tokens
        self.runs, self.same = self.runs + 1, self.same + same
        if stats is not None:
            self.accepted, self.proposed = self.accepted + stats.accepted, self.proposed + stats.proposed
            self.new_tokens += stats.new_tokens
            self.target_forwards += stats.target_forwards

    def rate(self) -> float:
        return statistics.median(n / s for n, s in zip(self.tokens, self.seconds))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="run or checkpoint directory of the target (with --draft)")
    p.add_argument("--draft", help="run or checkpoint directory of the draft (with --target)")
    p.add_argument("--train-steps", type=int, default=300, help="steps of each model trained when no runs are given")
    p.add_argument("--work", help="where to train (and reuse) the two runs; default a temporary directory")
    p.add_argument("--k", type=int, nargs="+", default=[4], help="draft tokens per round; one row per value")
    p.add_argument("--min-confidence", type=float, nargs="+", default=[0.0],
                   help="SpeculativeDecoder min_confidence values; one row per value and k")
    p.add_argument("--repeats", type=int, default=3, help="passes over the prompts; the table shows medians")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=150)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (outputs must be identical); > 0: seeded sampling, where speculative decoding "
                        "keeps the target's distribution but not its tokens (identical: -)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU; 0 = torch's default")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.target is None) != (args.draft is None):
        p.error("give both --target and --draft, or neither (then both are trained)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.target is None:
            work = Path(args.work or tmp)
            args.target, args.draft = work / "target", work / "draft"
            train(args.target, TARGET, args.train_steps, args.device)
            train(args.draft, [*DRAFT, "--teacher", str(args.target)], args.train_steps, args.device)
        target, tokenizer = load_for_inference(args.target, args.device)
        draft, draft_tokenizer = load_for_inference(args.draft, args.device)
    texts = prompts(args.prompts)
    sampling = Sampling(args.temperature)
    mode = "greedy" if sampling.greedy else f"temperature {args.temperature:g}"
    plain = Generator(target, tokenizer)
    variants = {(k, c): SpeculativeDecoder(target, draft, tokenizer, k=k, draft_tokenizer=draft_tokenizer,
                                           min_confidence=c)
                for k in args.k for c in args.min_confidence}
    print(f"target: {params(target)} | draft: {params(draft)} ({target.num_params() / draft.num_params():.1f}× "
          f"smaller) | {len(texts)} prompts of 5-{5 * len(texts)} chars × up to {args.max_new_tokens} new tokens, "
          f"{mode}, {args.repeats} passes | {args.device}, {torch.get_num_threads()} threads (decode steps and rounds: "
          f"{plain.decode_threads or torch.get_num_threads()})")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    plain.generate(texts[0], 8, sampling, seed=0)  # warm-up
    for decoder in variants.values():
        decoder.generate(texts[0], 8, sampling=sampling, seed=0)
    base, tallies = Tally(args.repeats), {v: Tally(args.repeats) for v in variants}
    for rep in range(args.repeats):
        for i, text in enumerate(texts):
            seed = rep * len(texts) + i
            [ref], seconds = timed(plain.generate, text, args.max_new_tokens, sampling, seed=seed)
            base.add(rep, seconds, len(ref.tokens))
            for v, decoder in variants.items():
                (got, stats), seconds = timed(decoder.generate, text, args.max_new_tokens, sampling=sampling,
                                              seed=seed)
                tallies[v].add(rep, seconds, len(got.tokens), stats, got.tokens == ref.tokens)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    header = ("k", "min conf", "plain tok/s", "spec tok/s", "speed-up", "acceptance", "tokens/target fwd",
              "identical")
    rows = []
    for (k, c), t in tallies.items():
        speedup = statistics.median((bs / bn) / (s / n) for bs, bn, s, n in
                                    zip(base.seconds, base.tokens, t.seconds, t.tokens))
        rows.append((str(k), f"{c:g}", f"{base.rate():.0f}", f"{t.rate():.0f}", f"{speedup:.2f}×",
                     f"{t.accepted / max(t.proposed, 1):.2f}", f"{t.new_tokens / max(t.target_forwards, 1):.2f}",
                     f"{t.same}/{t.runs}" if sampling.greedy else "-"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in (header, tuple("-" * w for w in widths), *rows):
        print(" | ".join(cell.rjust(w) for cell, w in zip(line, widths)))
    mismatches = sum(t.runs - t.same for t in tallies.values()) if sampling.greedy else 0
    if mismatches:
        print(f"{mismatches} greedy outputs differ from the target alone (ties in low precision, or a bug)")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
