"""Generation speed on this machine: decode tokens/s with and without the KV cache, eager and compiled, and how
close a gpt2-124m-shaped decode comes to the memory-bandwidth bound.

    python bench/generate.py                                                  # both tables, 3 repeats per row
    python bench/generate.py --tables bound --dtype fp32 --batch 1 --profile  # + decode steps profiled
    python bench/generate.py --new-tokens 24 --bound-new-tokens 6 --repeats 1 --compile 0   # a smoke run

Every row runs the engine itself, `scalelm.infer.Generator(...).stream(...)`, greedy, on random weights: how fast
a forward runs does not depend on the values of the weights (greedy on random weights just picks other tokens).
The time to the first token (the prefill, and sampling the first token from its logits) is timed apart and
excluded; the decode time runs from the first token to the last, `new - 1` one-token steps per row, so

    decode tokens/s = batch × (new - 1) / decode seconds

which includes what the engine does around the model each step (sampling, detokenizing, stop-string checks).
Each row: an untimed warm-up generation (a prefill and two decode steps; a compiled engine's is as long as the
timed ones, as its graph is specialized to the cache length), then the median of `--repeats` timed ones (in
table 1, the rows take turns: each repeat runs every row once). The
header gives the load average: with as many threads as cores, a parallel region waits for every thread, so one
busy neighbour process slows the steps several-fold (ten-fold and more for oneDNN and bf16 kernels): time on a
quiet machine.

1. The default model (`--preset`, shakespeare-char) at `--new-tokens` (256) from a few-character prompt, batch 1,
   fp32: without the KV cache (every step recomputes the whole sequence), with it, and with it and the decode step
   `torch.compile`d (`Generator(compile=True)`; the prefill stays eager). The compile time is excluded from
   tokens/s and printed: the warm-up's decode time minus its steps at the timed median (Inductor's on-disk caches
   make it seconds on a machine that compiled this graph before, tens of seconds the first time). The cached rows
   decode with the engine's default threads (`auto_decode_threads`: one intra-op thread for a model this small);
   one more row, "KV cache, eager, N threads", decodes with all of the process's threads, and `--threads 1` runs
   every row (the no-cache one too) on one thread: the speed-up at equal threads. Where prompt +
   new tokens do not fit the preset's context (shakespeare-char's is 256), the context is stretched to fit: a
   longer RoPE table only, the same weights and the same work per token. Issue target: the cache ≥ 5× faster.

2. A `--bound-preset` (gpt2-124m) model at each `--batch` (1, 8) and `--dtype` (fp32; bf16 = the weights converted
   with `.to(torch.bfloat16)`, so the KV cache is bf16 too), from a `--bound-prompt-tokens` (16) prompt of random
   ids (a stand-in tokenizer of space-separated ids), `--bound-new-tokens` (32) new tokens, eager, next to the
   memory-bandwidth bound of a decode step:

       bound tokens/s = batch × bandwidth / bytes read per step
       bytes per step = weight bytes + KV cache bytes at the mean position

   Weight bytes: every parameter × its element size, except the tables a step only gathers a row or two from (the
   position table, and the token table unless it is the head's weight: gpt2's tied embedding/head counts once, as
   the head reads it whole). KV bytes: keys and values of every layer for `batch` rows at the mean attended
   length, prompt + new/2. (The engine's attention reads the whole cache buffer, prompt + new positions, under
   its mask; at these lengths the KV bytes are a few % of the weights either way.) `--matmul`: each variant runs
   on its own copy of the model: kernel = the engine's default for a model this size (`auto_decode_kernels`:
   the linear layers' few-row products by `scalelm.kernels.cpu.decode`'s streaming kernel, the weights on huge
   pages), blas = PyTorch's F.linear (`decode_kernels=False`), onednn = `OneDNNLinear` (fp32 only). "linear GB/s" times one step's linear
   layers alone, in order, at the row's batch (best of a few passes, the decode's threads): the rate the weights
   stream at, next to the bandwidth. On a CPU without native bf16 matmuls (AVX2 only) PyTorch's bf16 products run
   through conversion kernels; the decode kernel widens bf16 weights as it loads them. The table reports what it
   measures. Rows take turns per repeat, as in table 1.
   Issue target: batch-1 decode ≥ 50% of the bound.

   Bandwidth: bytes READ per second by a `torch.sum` over a `--bw-mb` (512 MB) fp32 tensor, far larger than the
   caches, on 4 KiB pages and on huge pages where the machine has them (the kernel's weights are), the best call:
   on 1 thread and on the decode's threads at the start (printed), then on the decode's threads for 0.3 s just
   before each timed generation. A shared host's memory rate drifts by tens of percent within minutes, so each
   generation is held against the bound of its own moment: % bound is the median over the repeats of tokens/s /
   that bound. A decode step streams the weights once and writes almost nothing, so a
   read-only stream is the rate it could reach. The copy figure printed at the top for reference
   (`scalelm.calibrate.machine.measure_memory_bw`: read + written bytes) measures another traffic: the written
   half, which a decode step hardly has, costs most CPUs an extra read per line.

`--profile` then runs torch.profiler over decode steps of the bound preset (fp32, batch 1, the engine's plain
linear layers): the model's forward alone (KVCache.prepare, forward, advance and argmax, as the engine calls
them), its median step time against the bound, and the operators that take the time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from scalelm.calibrate.machine import measure_memory_bw
from scalelm.data.tokenizer import CharTokenizer
from scalelm.infer.generate import Generator, auto_decode_threads, intra_op_threads
from scalelm.infer.sampling import Sampling
from scalelm.kernels.cpu import apply_cpu_kernels
from scalelm.kernels.cpu.decode import MAX_ROWS, apply_decode_kernels, gemv
from scalelm.kernels.cpu.pages import pack_on_huge_pages
from scalelm.model import get_preset
from scalelm.model.gpt import GPT, KVCache

GREEDY = Sampling(temperature=0.0)
WARM_TOKENS = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATMULS = ("aten::addmm", "aten::mm", "aten::bmm", "scalelm::gemv", "scalelm_cpu_gemv::gemv")


class IdTokenizer:
    """A stand-in tokenizer for a model whose vocabulary no char tokenizer covers: text is space-separated ids."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in ids)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(preset: str, dtype: str = "fp32", context: int = 0) -> GPT:
    """A `preset` model on random weights (seed 0), its context stretched to `context` where that is longer."""
    torch.manual_seed(0)
    cfg = get_preset(preset)
    if context > cfg.max_seq_len:
        cfg = replace(cfg, max_seq_len=context)
    return GPT(cfg).to(DTYPES[dtype]).eval()


def timed_generation(gen: Generator, prompts: list[str], new: int, use_cache: bool) -> tuple[float, float]:
    """(seconds to the first token, seconds from it to the last) of one greedy generation of `new` tokens."""
    start = time.perf_counter()
    first = None
    count = 0
    for delta in gen.stream(prompts, new, GREEDY, use_cache=use_cache):
        if first is None:
            first = time.perf_counter()
        count += len(delta.tokens)
    end = time.perf_counter()
    if count != len(prompts) * new:
        raise RuntimeError(f"expected {len(prompts)} × {new} tokens, the engine gave {count}")
    return first - start, end - first


def measure(gen: Generator, prompts: list[str], new: int, use_cache: bool, repeats: int,
            compiled: bool = False) -> dict:
    """A warm-up generation, then `repeats` timed ones of `new` tokens: median prefill, decode step and decode
    tokens/s. The warm-up of an eager engine is short (WARM_TOKENS: a prefill and two decode steps); a compiled
    one's has the timed runs' length, as its graph is specialized to the cache's length, and its first decode
    step compiles: compile_s = the warm-up's decode time minus its steps at the timed median."""
    warm = new if compiled else min(new, WARM_TOKENS)
    _, warm_decode = timed_generation(gen, prompts, warm, use_cache)
    runs = [timed_generation(gen, prompts, new, use_cache) for _ in range(repeats)]
    return summarize(runs, len(prompts), new, warm, warm_decode)


def summarize(runs: list[tuple[float, float]], batch: int, new: int, warm: int, warm_decode: float) -> dict:
    """Medians of timed generations (see `measure`) and the compile time their warm-up implies."""
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    step = decode / (new - 1)
    return {"prefill_s": prefill, "decode_s": decode, "step_s": step,
            "tokens_per_s": batch * (new - 1) / decode, "compile_s": warm_decode - (warm - 1) * step}


class ReadBandwidth:
    """Bytes/s read by a sum over an fp32 tensor of `mb` MB, far larger than the caches, with `threads` intra-op
    threads (0: this process's): the best call over `seconds`, on 4 KiB pages and on huge pages (where the machine
    has them), the rate this CPU reaches at all (a decode step reads its weights the same way, once, front to
    back). The tensors are made once; `measure` is called next to each timed generation."""

    def __init__(self, mb: int):
        self.plain = torch.ones(mb * 2**20 // 4)
        huge = nn.Parameter(torch.ones(mb * 2**20 // 4), requires_grad=False)
        self.tensors = [self.plain, huge] if pack_on_huge_pages([huge]) else [self.plain]

    def measure(self, threads: int = 0, seconds: float = 1.0) -> float:
        times = []
        with intra_op_threads(threads):
            for x in self.tensors:
                x.sum()
                end = time.perf_counter() + seconds / len(self.tensors)
                while time.perf_counter() < end or len(times) < 3:
                    start = time.perf_counter()
                    x.sum()
                    times.append(time.perf_counter() - start)
        return self.plain.numel() * 4 / min(times)


def read_bandwidth(mb: int, threads: int = 0) -> float:
    """`ReadBandwidth(mb).measure(threads)`: one measurement, for a caller that needs only one."""
    return ReadBandwidth(mb).measure(threads)


def linear_bandwidth(model: GPT, batch: int, kernel: bool, repeats: int = 5) -> float:
    """Bytes/s at which one decode step's linear layers (all of them, in order, `batch` rows each) read their
    weights, by the decode kernel or F.linear: the best of `repeats` passes."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    dtype = layers[0].weight.dtype
    inputs = [torch.randn(batch, m.in_features).to(dtype) for m in layers]
    matmul = gemv if kernel else F.linear
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for m, x in zip(layers, inputs):
                matmul(x, m.weight, m.bias)
            times.append(time.perf_counter() - start)
    return sum(m.weight.numel() * m.weight.element_size() for m in layers) / min(times[1:])


def weight_bytes(model: GPT) -> int:
    """Bytes of the parameters a decode step reads whole: not the tables it gathers rows from (a tied
    embedding is the head's weight, read whole by the head, and counted once)."""
    head = model.output.weight if model.output is not None else None
    gathered = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is not head}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in gathered)


def kv_bytes(model: GPT, batch: int, length: float) -> float:
    """Bytes of keys and values of every layer for `batch` rows of `length` positions."""
    cfg = model.cfg
    elem = next(model.parameters()).element_size()
    return 2 * cfg.n_layer * batch * cfg.kv_heads * cfg.dim_head * length * elem


def cache_table(args) -> None:
    prompt, new = args.prompt, args.new_tokens
    tokenizer = CharTokenizer.from_text("\n" + "".join(chr(c) for c in range(32, 127)))
    model = build(args.preset, context=len(prompt) + new)
    cfg = model.cfg
    stretched = cfg.max_seq_len > get_preset(args.preset).max_seq_len
    print(f"\n1. {args.preset} ({model.num_params() / 1e6:.2f}M parameters, random weights), fp32, batch 1, "
          f"prompt {prompt!r} ({len(prompt)} tokens), {new} new tokens, greedy"
          + (f"; context stretched to {cfg.max_seq_len} to fit them" if stretched else ""))
    rows: dict[str, dict] = {}
    threads = torch.get_num_threads()
    # (name, use_cache, compiled, decode_threads, decode_kernels); each engine swaps layers of its own model copy
    modes = [("no cache", False, False, None, False), ("KV cache, eager", True, False, None, False),
             ("KV cache, eager, kernel", True, False, None, True), ("KV cache, compiled", True, True, None, False)]
    if threads > 1:
        modes.insert(2, (f"KV cache, eager, {threads} thr", True, False, threads, False))
    print(f"decode threads of the cached rows: {Generator(build(args.preset), tokenizer).decode_threads or threads} "
          f"(the engine's default for this model); the no-cache row and prefills: {threads}; PyTorch's linear "
          "layers (the engine's default), except the kernel row: scalelm's decode kernel (decode_kernels=True)")
    print(f"{'mode':26} {'prefill ms':>10} {'ms/token':>9} {'tokens/s':>9} {'× no cache':>10} {'compile s':>9}")
    engines, warmups, runs = {}, {}, {}
    for name, use_cache, compiled, decode_threads, decode_kernels in modes:
        if compiled and args.compile == "0":
            continue
        if not compiled and name != "no cache" and args.compile == "1":
            continue
        gen = engines[name] = Generator(build(args.preset, context=len(prompt) + new), tokenizer, compile=compiled,
                                        decode_threads=decode_threads, decode_kernels=decode_kernels)
        warm = new if compiled else min(new, WARM_TOKENS)
        warmups[name], runs[name] = (warm, timed_generation(gen, [prompt], warm, use_cache)[1]), []
    for _ in range(args.repeats):  # the rows in turn, so a change of the shared machine's load hits them alike
        for name, gen in engines.items():
            runs[name].append(timed_generation(gen, [prompt], new, name != "no cache"))
    for name in engines:
        r = rows[name] = summarize(runs[name], 1, new, *warmups[name])
        compiled = name == "KV cache, compiled"
        base = rows.get("no cache")
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:>9.1f}×" if base else f"{'n/a':>10}"
        compile_s = f"{r['compile_s']:>9.1f}" if compiled else f"{'':>9}"
        print(f"{name:26} {r['prefill_s'] * 1e3:>10.1f} {r['step_s'] * 1e3:>9.2f} {r['tokens_per_s']:>9.0f} "
              f"{speedup} {compile_s}", flush=True)
    gains = [f"{name.split(', ')[1]} {rows[name]['tokens_per_s'] / rows['no cache']['tokens_per_s']:.1f}×"
             for name in ("KV cache, eager", "KV cache, compiled") if name in rows and "no cache" in rows]
    if gains:
        print(f"KV cache speed-up over recomputing: {', '.join(gains)} (issue target ≥ 5×)")
    if "KV cache, eager" in rows and "KV cache, compiled" in rows:
        gain = rows["KV cache, compiled"]["tokens_per_s"] / rows["KV cache, eager"]["tokens_per_s"]
        print(f"compiled decode step vs eager: {gain:.2f}× the tokens/s")


def id_prompts(vocab: int, batch: int, length: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    return [" ".join(str(i) for i in row.tolist()) for row in ids]


def bound_table(args) -> None:
    prompt_len, new = args.bound_prompt_tokens, args.bound_new_tokens
    batches = [int(b) for b in args.batch.split(",")]
    variants = [(dtype, matmul) for dtype in args.dtype.split(",") for matmul in args.matmul.split(",")
                if dtype == "fp32" or matmul != "onednn"]  # oneDNN's linear takes fp32 only
    engines = {}
    for dtype, matmul in variants:  # each variant its own model copy: the engine swaps its layers in place
        model = build(args.bound_preset, dtype)
        if matmul == "onednn":
            apply_cpu_kernels(model, matmul="onednn", kernels=False)  # nn.Linear → OneDNNLinear, nothing else
        engines[dtype, matmul] = Generator(model, IdTokenizer(model.cfg.vocab_size), decode_kernels=matmul == "kernel")
    threads = {gen.decode_threads or torch.get_num_threads() for gen in engines.values()}
    reader = ReadBandwidth(args.bw_mb)
    bws = {n: reader.measure(n) for n in sorted(threads | {1, torch.get_num_threads()})}
    print(f"\n2. {args.bound_preset} (random weights), prompt {prompt_len} tokens, {new} new tokens, greedy, eager; "
          "best read bandwidth at the start: " + ", ".join(f"{bw / 1e9:.1f} GB/s on {n} thread{'s' * (n > 1)}"
                                                           for n, bw in bws.items()))
    print("bound = batch × bandwidth (the decode's threads, measured just before each timed generation) / (weight + "
          "KV cache bytes at the mean attended length, prompt + new/2), median over the repeats; % bound = median of "
          "tokens/s / the bound of the same moment; matmul: kernel = scalelm's decode kernel (the engine's default "
          "here), blas = F.linear, onednn = OneDNNLinear; linear GB/s = one step's linear layers alone (best pass)")
    print(f"{'dtype':5} {'matmul':6} {'batch':>5} {'thr':>3} {'weights MB':>10} {'KV MB':>6} {'bound tok/s':>11} "
          f"{'linear GB/s':>11} {'prefill ms':>10} {'ms/step':>8} {'tokens/s':>9} {'% bound':>7}")
    runs: dict[tuple, list] = {}
    bandwidths: dict[tuple, list] = {}
    warm = {}
    for key, gen in engines.items():
        for batch in batches:
            prompts = id_prompts(gen.cfg.vocab_size, batch, prompt_len)
            warm[key + (batch,)] = (WARM_TOKENS, timed_generation(gen, prompts, WARM_TOKENS, True)[1])
            runs[key + (batch,)], bandwidths[key + (batch,)] = [], []
    for _ in range(args.repeats):  # every row once per repeat: a change of the machine's load hits them alike
        for (dtype, matmul), gen in engines.items():
            n = gen.decode_threads or torch.get_num_threads()
            for batch in batches:
                prompts = id_prompts(gen.cfg.vocab_size, batch, prompt_len)
                # The host's memory rate drifts by tens of percent within minutes: each generation is held
                # against the rate of its own moment.
                bandwidths[dtype, matmul, batch].append(reader.measure(n, seconds=0.3))
                runs[dtype, matmul, batch].append(timed_generation(gen, prompts, new, True))
    results = []
    for (dtype, matmul), gen in engines.items():
        model, n = gen.model, gen.decode_threads or torch.get_num_threads()
        weights = weight_bytes(model)
        for batch in batches:
            key = (dtype, matmul, batch)
            kv = kv_bytes(model, batch, prompt_len + new / 2)
            bounds = [batch * bw / (weights + kv) for bw in bandwidths[key]]
            rates = [batch * (new - 1) / decode for _, decode in runs[key]]
            share = statistics.median(rate / bound for rate, bound in zip(rates, bounds))
            with intra_op_threads(gen.decode_threads):
                linear_bw = linear_bandwidth(model, batch, matmul == "kernel" and batch <= MAX_ROWS)
            r = summarize(runs[key], batch, new, *warm[key])
            results.append((f"{dtype} {matmul}", batch, share))
            print(f"{dtype:5} {matmul:6} {batch:>5} {n:>3} {weights / 1e6:>10.1f} {kv / 1e6:>6.1f} "
                  f"{statistics.median(bounds):>11.1f} {linear_bw / 1e9:>11.1f} {r['prefill_s'] * 1e3:>10.0f} "
                  f"{r['step_s'] * 1e3:>8.1f} {r['tokens_per_s']:>9.1f} {100 * share:>6.1f}%", flush=True)
    seen = [bw for values in bandwidths.values() for bw in values]
    print(f"read bandwidth next to the generations: {min(seen) / 1e9:.1f}–{max(seen) / 1e9:.1f} GB/s")
    settled = []  # the engine times its steps on all threads and on one (ThreadChoice) and decodes with the faster
    for (dtype, matmul), gen in engines.items():
        if gen.thread_choice is not None:
            for batch in batches:
                times = {n: s for (key, n), s in gen.thread_choice.seconds.items() if key == batch}
                if times:
                    fastest = min(times, key=times.get)
                    settled.append(f"{dtype} {matmul} b{batch}: {fastest or torch.get_num_threads()}")
    if settled:
        print("decode threads the engine settled on (its steps timed; the bound takes all threads' bandwidth): "
              + ", ".join(settled))
    for variant, batch, share in results:
        if batch == 1:
            print(f"batch-1 {variant} decode at {100 * share:.0f}% of the bandwidth bound (issue target ≥ 50%)")


def profile_decode(args) -> None:
    """Profile decode steps of the bound preset, fp32, batch 1: the model's forward as the engine calls it."""
    from torch.profiler import ProfilerActivity, profile

    model = build(args.bound_preset)
    if args.matmul.split(",")[0] == "kernel":
        apply_decode_kernels(model)  # the first --matmul variant's linear layers
    prompt_len, steps = args.bound_prompt_tokens, 8
    tokens = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.cfg.n_layer, prompt_len + 3 * steps + 1, torch.zeros(1, dtype=torch.long))

    def step(x: torch.Tensor) -> torch.Tensor:
        cache.prepare(x.shape[1])
        logits = model(x, cache=cache)[:, -1]
        cache.advance()
        return logits.argmax(-1, keepdim=True)

    with torch.inference_mode():
        nxt = step(tokens)
        times = []
        for _ in range(2 * steps):  # warm-up, then timed steps (median)
            start = time.perf_counter()
            nxt = step(nxt)
            times.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                nxt = step(nxt)
    step_s = statistics.median(times[steps:])
    bw = read_bandwidth(args.bw_mb, auto_decode_threads(model))
    bound = bw / (weight_bytes(model) + kv_bytes(model, 1, prompt_len + 2 * steps))
    print(f"\nprofile: {args.bound_preset} fp32 batch 1, the forward alone (prepare, forward, advance, argmax): "
          f"{step_s * 1e3:.1f} ms/step = {1 / step_s:.1f} tokens/s = {100 / step_s / bound:.0f}% of the bound; "
          f"{steps} steps profiled (times are per {steps} steps)")
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)  # µs over the profiled steps
    matmul = sum(e.self_cpu_time_total for e in averages if e.key in MATMULS)
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))
    print(f"matmuls ({', '.join(MATMULS)}): {matmul / steps / 1e3:.1f} ms/step = {100 * matmul / total:.0f}% of the "
          f"operators' time, streaming the linear weights at {linear_bytes * steps / (matmul / 1e6) / 1e9:.1f} GB/s; "
          f"every other operator: {(total - matmul) / steps / 1e3:.1f} ms/step over "
          f"{sum(e.count for e in averages) // steps} operator calls a step (nested calls included)")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default="cache,bound",
                   help="comma-separated: cache (table 1), bound (table 2); none (with --profile)")
    p.add_argument("--preset", default="shakespeare-char", help="table 1's model")
    p.add_argument("--prompt", default="ROMEO:", help="table 1's prompt (characters)")
    p.add_argument("--new-tokens", type=int, default=256, help="table 1's new tokens")
    p.add_argument("--compile", choices=["0", "1", "both"], default="both",
                   help="table 1's cached rows: eager (0), compiled decode step (1) or both")
    p.add_argument("--bound-preset", default="gpt2-124m", help="table 2's model")
    p.add_argument("--bound-prompt-tokens", type=int, default=16)
    p.add_argument("--bound-new-tokens", type=int, default=32, help="table 2's new tokens")
    p.add_argument("--batch", default="1,8", help="table 2's batch sizes, comma-separated")
    p.add_argument("--dtype", default="fp32,bf16", help="table 2's dtypes, comma-separated: fp32, bf16")
    p.add_argument("--matmul", default="blas,kernel",
                   help="table 2's linear layers: blas (PyTorch's F.linear, decode_kernels=False), kernel "
                        "(scalelm's decode kernel, the engine's default for this model size), onednn (OneDNNLinear; fp32 only), comma-separated; the first "
                        "is --profile's")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per row (median), after one warm-up")
    p.add_argument("--bw-mb", type=int, default=512, help="MB of the fp32 tensor the read bandwidth is summed over")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--profile", action="store_true", help="then profile decode steps of the bound preset")
    p.add_argument("--profile-rows", type=int, default=20)
    args = p.parse_args()
    tables = [] if args.tables == "none" else args.tables.split(",")
    if any(t not in ("cache", "bound") for t in tables):
        p.error(f"--tables: {args.tables!r}: give cache, bound, both or none")
    if any(d not in DTYPES for d in args.dtype.split(",")):
        p.error(f"--dtype: {args.dtype!r}: give fp32, bf16 or both")
    if any(m not in ("kernel", "blas", "onednn") for m in args.matmul.split(",")):
        p.error(f"--matmul: {args.matmul!r}: give kernel, blas, onednn, comma-separated")
    if min(args.new_tokens, args.bound_new_tokens) < 2 or args.repeats < 1:
        p.error("--new-tokens and --bound-new-tokens must be >= 2 (a prefill token, then decode steps), "
                "--repeats >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else ""
    print(f"CPU {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads{load}; copy bandwidth (read + write bytes) "
          f"{measure_memory_bw() * 1e3:.1f} GB/s", flush=True)
    if "cache" in tables:
        cache_table(args)
    if "bound" in tables:
        bound_table(args)
    if args.profile:
        profile_decode(args)


if __name__ == "__main__":
    main()
