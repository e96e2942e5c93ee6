"""Decode speed of one model in PyTorch, onnxruntime and OpenVINO (CPU, fp32), all driven by the same engine.

    python bench/onnx_decode.py                                  # shakespeare-char random weights, batch 1 and 8, 3 repeats
    python bench/onnx_decode.py --preset tiny --new-tokens 16 --repeats 1 --batch 1      # a smoke run

The model (`--preset`, random weights: speed does not depend on their values) is exported once with its KV cache
(`export_onnx(..., with_cache=True)`, the file `scalelm generate --runtime` runs); then each runtime generates
`--new-tokens` greedy tokens for `--batch` copies of a short prompt with `scalelm.infer.Generator`, so sampling,
stops and detokenizing cost the same in every row. The first token (the prefill) is excluded:

    decode tokens/s = batch × (new - 1) / seconds from the first token to the last

PyTorch runs eagerly with the GEMM backend `scalelm generate` picks (`cpu_matmul`). The runtimes differ in the
cache: PyTorch writes a pre-allocated buffer in place, the ONNX graph concatenates past and new keys each step and
hands them back (host arrays). Every runtime gets `--threads` (1) intra-op threads. Each row: an untimed warm-up, then the median of `--repeats`. The header gives the
load average: time on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from scalelm.data.tokenizer import CharTokenizer
from scalelm.infer import Generator, Sampling
from scalelm.infer.onnx_export import export_onnx
from scalelm.infer.onnx_runtime import OnnxModel
from scalelm.model import get_preset
from scalelm.model.gpt import GPT

TOKENIZER = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\n")


def decode_rate(generator: Generator, batch: int, new: int) -> float:
    first = last = None
    for _ in generator.stream(["ROMEO:\n"] * batch, new, Sampling(0.0)):
        last = time.perf_counter()
        first = first or last
    return batch * (new - 1) / (last - first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every runtime")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(replace(get_preset(args.preset), vocab_size=64)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "model.onnx", with_cache=True)
        export_s = time.perf_counter() - start
        from scalelm.train.peak import fastest_cpu_matmul

        runtimes = {"pytorch": lambda: Generator(model, TOKENIZER, cpu_matmul=fastest_cpu_matmul("fp32")),
                    "onnxruntime": lambda: Generator(OnnxModel(path, "onnxruntime", args.threads), TOKENIZER),
                    "openvino": lambda: Generator(OnnxModel(path, "openvino", args.threads), TOKENIZER)}
        print(f"# bench/onnx_decode.py: {args.preset} (random weights, fp32), {args.new_tokens} new tokens, greedy; export "
              f"{export_s:.1f} s; {args.threads} thread(s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
              f"cores; median of {args.repeats}")
        print(f"{'runtime':<12} " + " ".join(f"{'batch ' + str(b) + ' tok/s':>15}" for b in args.batch))
        base: dict[int, float] = {}
        for name, build in runtimes.items():
            generator = build()
            rates = []
            for batch in args.batch:
                decode_rate(generator, batch, min(args.new_tokens, 8))  # warm-up
                rate = statistics.median(decode_rate(generator, batch, args.new_tokens) for _ in range(args.repeats))
                base.setdefault(batch, rate)
                rates.append(f"{rate:>8.1f} ({rate / base[batch]:.2f}x)")
            print(f"{name:<12} " + " ".join(f"{r:>15}" for r in rates))


if __name__ == "__main__":
    main()
