"""Serving throughput and latency: 32 concurrent streamed requests against `scalelm serve`, batched vs one at a time.

    python bench/serve.py                              # random shakespeare-char-sized run, 32 clients, 3 repeats
    python bench/serve.py --run runs/demo --clients 32 --max-tokens 64
    python bench/serve.py --clients 4 --max-tokens 8 --repeats 1        # a smoke run

Each mode starts `scalelm serve` in its own process on a loopback port — `--max-batch CLIENTS` (dynamic batching:
the requests waiting when a batch starts decode together) and `--max-batch 1` (one request at a time, the others
queued) — and `--clients` threads each send one streamed completion with the official openai client at the same
moment (a barrier), `--max-tokens` tokens at temperature 0.8, each its own seed, with the usage chunk. The server
runs `--threads` (1) intra-op threads: the client threads share the machine with it, and an OpenMP region waits
for its slowest thread, so on a busy machine one thread is the steadier measure.

    aggregate tokens/s = completion tokens of all requests / seconds from the barrier to the last request's end
    time to first token = seconds from the barrier to a request's first text chunk (p50 and p99 over requests)

Every request must complete with its full token count. Each mode: one untimed warm-up round, then the median of
`--repeats` rounds (tokens/s and each percentile medianed separately). The header gives the load average: the
server, its batch and the client threads share this machine's cores, so time on a quiet one. Issue target:
batched ≥ 2× one at a time.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path


def _random_run(directory: Path, preset: str) -> Path:
    """A run directory with random weights of `preset` and a character tokenizer (speed does not depend on the
    values of the weights)."""
    import torch

    from scalelm.data.tokenizer import CharTokenizer
    from scalelm.model import get_preset
    from scalelm.model.gpt import GPT
    from scalelm.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    tokenizer = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\n")
    model = GPT(replace(get_preset(preset), vocab_size=64))
    run = directory / "run"
    save_checkpoint(run, 0, model, [], {}, keep=1)
    tokenizer.save(run / "tokenizer")
    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(run: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "scalelm", "serve", str(run), "--port", str(port),
                             "--max-batch", str(max_batch), "--model-name", "bench"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait for the model to load (/health 503 until then)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready within 300 s")


def _round(url: str, clients: int, max_tokens: int) -> tuple[float, list[float], int]:
    """(aggregate tokens/s, times to first token, completed requests) of one round of `clients` requests."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    barrier = threading.Barrier(clients + 1)
    first: list[float | None] = [None] * clients
    tokens = [0] * clients
    errors: list[str] = []
    start = [0.0]

    def one(i: int) -> None:
        barrier.wait()
        try:
            stream = client.completions.create(model="bench", prompt="ROMEO:\n", max_tokens=max_tokens,
                                               temperature=0.8, seed=i, stream=True,
                                               stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text and first[i] is None:
                    first[i] = time.perf_counter() - start[0]
                if chunk.usage is not None:
                    tokens[i] = chunk.usage.completion_tokens
        except Exception as e:  # reported below: a bench that loses requests has no result
            errors.append(f"{e.__class__.__name__}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start[0] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start[0]
    if errors:
        raise SystemExit(f"{len(errors)} request(s) failed, e.g. {errors[0]}")
    done = sum(t == max_tokens for t in tokens)
    return sum(tokens) / seconds, [f for f in first if f is not None], done


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=None, help="a run directory (default: random weights of --preset)")
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="the server's intra-op threads (OMP_NUM_THREADS)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else _random_run(Path(tmp), args.preset)
        print(f"# bench/serve.py: {args.clients} concurrent streamed completions of {args.max_tokens} tokens, "
              f"{run.name if args.run else args.preset + ' (random weights)'}; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; server threads {args.threads}; median of {args.repeats}")
        print(f"{'mode':<22} {'completed':>9} {'tokens/s':>9} {'TTFT p50 s':>11} {'TTFT p99 s':>11}")
        rates = {}
        for name, max_batch in (("batched (max-batch " + str(args.clients) + ")", args.clients),
                                ("one at a time", 1)):
            proc, url = _start_server(run, max_batch, args.threads)
            try:
                _round(url, args.clients, args.max_tokens)  # warm-up
                rounds = [_round(url, args.clients, args.max_tokens) for _ in range(args.repeats)]
            finally:
                proc.terminate()
                proc.wait()
            rate = statistics.median(r[0] for r in rounds)
            p50 = statistics.median(_percentile(r[1], 0.5) for r in rounds)
            p99 = statistics.median(_percentile(r[1], 0.99) for r in rounds)
            completed = min(r[2] for r in rounds)
            rates[max_batch] = rate
            print(f"{name:<22} {completed:>4}/{args.clients:<4} {rate:>9.1f} {p50:>11.3f} {p99:>11.3f}")
        print(f"batched / one at a time: {rates[args.clients] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
