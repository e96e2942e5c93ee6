"""Compression of a trained run, measured: size on disk and in memory, validation loss and decode speed of each
quantized, pruned and distilled variant next to the fp32 model it came from.

    python bench/compress.py --demo runs/demo                 # after `make demo`; writes variants to runs/compress
    python bench/compress.py --demo runs/demo --repeats 1 --recover-steps 2 --distill-steps 4    # a smoke run

Each variant is made by the `scalelm` command printed under the table (skipped where its directory already
exists, so a second call only measures). Columns:
- disk: bytes of the variant's model.safetensors, and how many times smaller than the fp32 checkpoint's;
- memory: bytes of the loaded model's parameters and buffers (quantized tensors by their integer storage);
- val loss: `scalelm eval` (the run's own evaluation windows), and its change against fp32;
- decode tokens/s: the generation engine (`Generator`, greedy, batch 1, the KV cache, the linear layers' GEMM
  backend `scalelm generate` picks) from "ROMEO:" for `--new-tokens`; the first token (prefill) excluded; the
  median of `--repeats` after a warm-up. Pruned weights are dense tensors with zeros: no sparse kernel runs them.
The student rows compare a half-width student trained `--distill-steps` steps on the data alone with the same
student distilled from the run (same seed, data, batches and steps). A last small table times one int4 and one int8
layer of the run's shape through PyTorch's CPU int4/int8 kernels against dequantize + matmul, the reason
Int4Linear dequantizes. The header gives the load average: time on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scalelm.cli import main as scalelm
from scalelm.compress.prune import is_two_four
from scalelm.compress.quantize import dequantize_int4, model_bytes, quantize_int4_groups, quantize_int8_rows
from scalelm.infer import Generator, Sampling
from scalelm.infer.evaluate import evaluate_checkpoint
from scalelm.infer.load import load_for_inference
from scalelm.train.checkpoint import resolve_checkpoint
from scalelm.train.peak import fastest_cpu_matmul

GREEDY = Sampling(temperature=0.0)
STUDENT = ["--model.d_model", "128", "--train.eval_every", "0", "--train.sample_tokens", "0", "--metrics.progress",
           "false", "--seed", "0", "--train.global_batch", "8", "--train.seq_len", "128", "--train.compile", "false"]
"""The students: half the default width, a quarter of the demo's tokens per step (a quick comparison)."""
RECOVERY = ["--train.compile", "false", "--metrics.progress", "false"]


def variants(demo: str, work: Path, recover: int, distill: int) -> list[tuple[str, list[str] | None, Path]]:
    """(name, scalelm arguments that make it or None, its directory)."""
    rows: list[tuple[str, list[str] | None, Path]] = [("fp32 (trained)", None, Path(demo))]
    for bits, group in ((8, None), (4, 32), (4, 64), (4, 128)):
        name = f"int{bits}" + (f" g{group}" if group else "")
        out = work / name.replace(" ", "-")
        rows.append((name, ["quantize", demo, "--bits", str(bits), *(["--group-size", str(group)] if group else []),
                            "--out", str(out)], out))
    for method, how, recover_steps in (("magnitude", "50%", 0), ("wanda", "50%", 0), ("wanda", "50%", recover),
                                       ("magnitude", "2:4", 0), ("wanda", "2:4", 0), ("wanda", "2:4", recover)):
        name = f"{method} {how}" + (f" + {recover_steps} recovery steps" if recover_steps else "")
        out = work / (f"{method}-{how.replace('%', '').replace(':', 'of')}" +
                      (f"-recovered{recover_steps}" if recover_steps else ""))
        sparsity = ["--pattern", "2:4"] if how == "2:4" else ["--sparsity", "0.5"]
        rows.append((name, ["prune", demo, "--method", method, *sparsity,
                            *(["--recover-steps", str(recover_steps), *RECOVERY] if recover_steps else []),
                            "--out", str(out)],
                     out))
    steps = ["--train.steps", str(distill)]
    plain, distilled = work / f"student-data-only-{distill}", work / f"student-distilled-{distill}"
    rows.append((f"student d_model 128, {distill} steps, data only",
                 ["train", "--model.preset", "shakespeare-char", *STUDENT, *steps, "--out", str(plain)], plain))
    rows.append((f"student d_model 128, {distill} steps, distilled",
                 ["distill", "--teacher", demo, "--student", "shakespeare-char", "--alpha", "0.5", "--temperature",
                  "2", *STUDENT, *steps, "--out", str(distilled)], distilled))
    return rows


def decode_rate(model, tokenizer, new_tokens: int, repeats: int) -> float:
    generator = Generator(model, tokenizer, cpu_matmul=fastest_cpu_matmul("fp32"))
    generator.generate("ROMEO:", 3, GREEDY)  # warm-up
    rates = []
    for _ in range(repeats):
        start, tokens = None, 0
        for delta in generator.stream("ROMEO:", new_tokens, GREEDY):
            if start is None:
                start = time.perf_counter()  # after the first token: the prefill is not decode
                continue
            tokens += len(delta.tokens)
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def two_four_ok(model) -> bool:
    return all(is_two_four(m.weight) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "output")


def kernel_table(d_in: int, d_out: int, repeats: int = 20) -> list[str]:
    """ms per call of one linear layer [d_out, d_in] at 1 and 256 rows: fp32, int4/int8 through PyTorch's CPU
    kernels, and dequantize + matmul."""
    w = torch.randn(d_out, d_in)
    q, scale, zero = quantize_int4_groups(w, 32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)
    # The kernel's form is (q - 8) · scale + zero': zero' = zero + 8 · scale gives the same weights.
    scales_zeros = torch.stack((scale.t().float(), (zero.float() + 8 * scale.float()).t()), -1).contiguous()
    q8, s8 = quantize_int8_rows(w)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) * 1e3

    lines = ["| rows | fp32 F.linear | int4 _weight_int4pack_mm_for_cpu | int4 dequantize + F.linear | "
             "int8 _weight_int8pack_mm | int8 dequantize + F.linear |", "|---|---|---|---|---|---|"]
    for rows in (1, 256):
        x = torch.randn(rows, d_in)
        calls = [lambda x=x: F.linear(x, w),
                 lambda x=x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros),
                 lambda x=x: F.linear(x, dequantize_int4(q, scale, zero)),
                 lambda x=x: torch.ops.aten._weight_int8pack_mm(x, q8, s8),
                 lambda x=x: F.linear(x, q8.float() * s8[:, None])]
        lines.append(f"| {rows} | " + " | ".join(f"{best(call):.3f} ms" for call in calls) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default="runs/demo", help="the trained run to compress")
    p.add_argument("--work", default="runs/compress", help="where the variants are written")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--recover-steps", type=int, default=20)
    p.add_argument("--distill-steps", type=int, default=100)
    args = p.parse_args()
    work = Path(args.work)
    rows = variants(args.demo, work, args.recover_steps, args.distill_steps)
    for name, argv, out in rows:
        if argv is not None and not out.exists():
            print(f"making {name}: scalelm {' '.join(argv)}", flush=True)
            if scalelm(argv) != 0:
                raise SystemExit(f"`scalelm {' '.join(argv)}` failed")
    dense_disk = dense_loss = dense_memory = None
    table = ["| variant | disk MB | x smaller | memory MB | val loss | vs fp32 | decode tokens/s | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for name, _argv, out in rows:
        checkpoint = resolve_checkpoint(out)
        disk = (checkpoint / "model.safetensors").stat().st_size
        model, tokenizer = load_for_inference(out)
        memory = model_bytes(model)
        loss = evaluate_checkpoint(out).val_loss
        if dense_disk is None:
            dense_disk, dense_loss, dense_memory = disk, loss, memory
        note = ("2:4 pattern verified" if two_four_ok(model) else "2:4 pattern BROKEN") if "2:4" in name else ""
        rate = decode_rate(model, tokenizer, args.new_tokens, args.repeats)
        table.append(f"| {name} | {disk / 1e6:.2f} | {dense_disk / disk:.2f} | {memory / 1e6:.2f} "
                     f"({dense_memory / memory:.2f}x) | {loss:.4f} | {100 * (loss - dense_loss) / dense_loss:+.2f}% | "
                     f"{rate:,.0f} | {note} |")
        print(table[-1], flush=True)
    dense = load_for_inference(args.demo)[0]
    shape = dense.layers["0"].mlp.w1.weight.shape
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("\n".join(table))
    print("\ncommands:")
    for name, argv, _out in rows:
        if argv is not None:
            print(f"  {name}: scalelm {' '.join(argv)}")
    print(f"\none linear layer [{shape[0]}, {shape[1]}] (the run's MLP input), best of 20:\n")
    print("\n".join(kernel_table(shape[1], shape[0])))


if __name__ == "__main__":
    main()
