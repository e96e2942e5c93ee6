"""Speculative decoding against plain cached decoding of the same target: tokens/s, acceptance, speed-up.

    python bench/speculative.py --train-steps 600            # trains a target and a draft on the bundled Shakespeare
    python bench/speculative.py --target RUN --draft RUN --k 2 4 8 --device cuda

With no runs given, `scalelm train` first trains the target (shakespeare-char: 4 layers, d_model 256, ~3.4M
parameters) and a draft 13× smaller (1 layer, d_model 128, same vocabulary) on the same data, for --train-steps
steps each (in --work DIR, kept and reused when given; else a temporary directory). Then, for each k, 20 prompts
(passages of 5 to 100 characters from the ends of the bundled works) are continued greedily by the target alone
(`Generator`, KV cache) and by speculative decoding, in turn per prompt so a change of the shared machine's speed
hits both. tokens/s are medians over the prompts; speed-up is the median of the per-prompt ratios; acceptance and
tokens per target forward are totals over the prompts. Greedy outputs must be identical (counted, exit 1 if not).
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

TARGET_ARGS = ["--model.preset", "shakespeare-char"]
DRAFT_ARGS = ["--model.preset", "shakespeare-char", "--model.n_layer", "1", "--model.d_model", "128"]


def train(out: Path, model_args: list[str], steps: int, device: str) -> None:
    if (out / "checkpoints").is_dir():
        print(f"reusing {out}", flush=True)
        return
    print(f"training {out.name} ({' '.join(model_args)}) for {steps} steps ...", flush=True)
    cmd = [sys.executable, "-m", "scalelm", "train", "--out", str(out), *model_args, "--train.steps", str(steps),
           "--train.eval_every", "0", "--train.sample_tokens", "0", "--metrics.progress", "false",
           "--device", device]
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="run or checkpoint directory of the target (with --draft)")
    p.add_argument("--draft", help="run or checkpoint directory of the draft (with --target)")
    p.add_argument("--train-steps", type=int, default=600, help="steps of each model trained when no runs are given")
    p.add_argument("--work", help="where to train (and reuse) the two runs; default a temporary directory")
    p.add_argument("--k", type=int, nargs="+", default=[4], help="draft tokens per round; one row per value")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=150)
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
            train(args.target, TARGET_ARGS, args.train_steps, args.device)
            train(args.draft, DRAFT_ARGS, args.train_steps, args.device)
        target, tokenizer = load_for_inference(args.target, args.device)
        draft, draft_tokenizer = load_for_inference(args.draft, args.device)
    texts = prompts(args.prompts)
    plain = Generator(target, tokenizer)
    print(f"target: {params(target)} | draft: {params(draft)} | {len(texts)} prompts of 5-{5 * len(texts)} chars "
          f"× up to {args.max_new_tokens} new tokens, greedy | {args.device}, {torch.get_num_threads()} threads "
          f"(decode steps and rounds of both: {plain.decode_threads or torch.get_num_threads()}) | load average "
          f"{os.getloadavg()[0]:.1f}")
    header = ("k", "plain tok/s", "spec tok/s", "speed-up", "acceptance", "tokens/target fwd", "identical")
    rows = []
    mismatches = 0
    for k in args.k:
        decoder = SpeculativeDecoder(target, draft, tokenizer, k=k, draft_tokenizer=draft_tokenizer)
        decoder.generate(texts[0], 8), plain.generate(texts[0], 8, Sampling(0.0))  # warm-up
        plain_rates, spec_rates, ratios = [], [], []
        accepted = proposed = new_tokens = target_forwards = same = 0
        for text in texts:
            [ref], t_plain = timed(plain.generate, text, args.max_new_tokens, Sampling(0.0))
            (got, stats), t_spec = timed(decoder.generate, text, args.max_new_tokens)
            same += got.tokens == ref.tokens
            n = len(ref.tokens)
            plain_rates.append(n / t_plain)
            spec_rates.append(len(got.tokens) / t_spec)
            ratios.append(t_plain / t_spec * len(got.tokens) / max(n, 1))
            accepted, proposed = accepted + stats.accepted, proposed + stats.proposed
            new_tokens, target_forwards = new_tokens + stats.new_tokens, target_forwards + stats.target_forwards
        mismatches += len(texts) - same
        rows.append((str(k), f"{statistics.median(plain_rates):.0f}", f"{statistics.median(spec_rates):.0f}",
                     f"{statistics.median(ratios):.2f}×", f"{accepted / max(proposed, 1):.2f}",
                     f"{new_tokens / max(target_forwards, 1):.2f}", f"{same}/{len(texts)}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in (header, tuple("-" * w for w in widths), *rows):
        print(" | ".join(cell.rjust(w) for cell, w in zip(line, widths)))
    if mismatches:
        print(f"{mismatches} greedy outputs differ from the target alone (ties in low precision, or a bug)")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
