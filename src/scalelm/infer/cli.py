"""`scalelm generate` and `scalelm eval`: argv in, exit code out.

generate prints the generated text alone on stdout (one completion per prompt, each followed by a newline), so
scripts can compare outputs; progress and timing go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from scalelm.launch import exec_torchrun, is_launched, pop_nproc
from scalelm.usage import CliParser, UsageError


def _generate_parser() -> CliParser:
    p = CliParser(prog="scalelm generate", description="Continue prompts with a trained model (KV cache, batched).")
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue (repeat for a batch; default: a newline)")
    p.add_argument("--prompt-file", default=None, help="a file whose whole text is one more prompt")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (1 = all)")
    p.add_argument("--greedy", action="store_true", help="always the likeliest token (= --temperature 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR",
                   help="end a completion where one of these strings appears (not included)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for every token")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--draft", default=None, help="a smaller run or checkpoint with the same tokenizer: speculative "
                   "decoding (one prompt; greedy output is the target's own)")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per round (default 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, default=1, help="tensor-parallel generation on N processes (torchrun)")
    p.add_argument("--runtime", choices=["pytorch", "onnxruntime", "openvino"], default="pytorch",
                   help="run the model in PyTorch (default) or, exported to ONNX, in onnxruntime or OpenVINO on the CPU")
    p.add_argument("--onnx", default=None, help="with --runtime onnxruntime|openvino: the file `scalelm export onnx "
                   "RUN --out FILE --with-cache` wrote (default: export the run to a temporary file first)")
    return p


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompt-file {args.prompt_file}: cannot read it ({e.__class__.__name__})") from None
        if not text:
            raise UsageError(f"--prompt-file {args.prompt_file} is empty; put the prompt text in it")
        prompts.append(text)
    return prompts or ["\n"]


def main_generate(argv: list[str]) -> int:
    args = _generate_parser().parse_args(argv)
    from scalelm.infer.sampling import Sampling

    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc} must be >= 1")
    if args.nproc > 1 and args.draft is not None:
        raise UsageError("--draft (speculative decoding) runs in one process; leave out --nproc")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
    if args.draft_tokens < 1:
        raise UsageError(f"--draft-tokens {args.draft_tokens} must be >= 1")
    try:
        sampling = Sampling(0.0 if args.greedy else args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UsageError(f"{e}; see `scalelm generate --help`") from None
    prompts = _prompts(args)
    if args.runtime != "pytorch":
        return _generate_onnx(args, prompts, sampling)
    if args.onnx is not None:
        raise UsageError("--onnx needs --runtime onnxruntime or --runtime openvino")
    if args.nproc > 1 or is_launched():
        return _generate_tp(args, argv, prompts, sampling)
    from scalelm.infer.generate import Generator
    from scalelm.infer.load import load_for_inference

    start = time.perf_counter()
    model, tokenizer = load_for_inference(args.path, args.device)
    loaded = time.perf_counter()
    if args.draft is not None:
        completions = [_speculative(args, model, tokenizer, prompts, sampling)]
    else:
        generator = Generator(model, tokenizer, compile=args.compile, cpu_matmul=_cpu_matmul(args.device))
        completions = generator.generate(prompts, args.max_new_tokens, sampling, seed=args.seed, stop=args.stop,
                                         use_cache=not args.no_cache)
    _print(completions, time.perf_counter() - loaded, f"{', no cache' if args.no_cache else ''}; loading took "
           f"{loaded - start:.2f} s")
    return 0


def _generate_onnx(args, prompts: list[str], sampling) -> int:
    """The engine over an ONNX export of the run in onnxruntime or OpenVINO (CPU, fp32)."""
    for flag, value in (("--draft", args.draft), ("--compile", args.compile), ("--no-cache", args.no_cache),
                        ("--nproc", args.nproc > 1), ("--device", args.device != "cpu")):
        if value:
            raise UsageError(f"{flag} works with --runtime pytorch only; leave it out with --runtime {args.runtime}")
    import tempfile

    from scalelm.data import load_tokenizer
    from scalelm.infer.generate import Generator
    from scalelm.infer.load import tokenizer_dir
    from scalelm.infer.onnx_runtime import OnnxModel
    from scalelm.train.checkpoint import resolve_checkpoint

    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_dir(resolve_checkpoint(args.path)))
    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx
        if path is None:
            from scalelm.infer.onnx_export import export_onnx
            from scalelm.train.checkpoint import load_model

            print("exporting the run to ONNX first (keep a file with `scalelm export onnx RUN --out FILE "
                  "--with-cache` and pass --onnx FILE)", file=sys.stderr)
            path = export_onnx(load_model(args.path).float(), Path(tmp) / "model.onnx", with_cache=True)
        model = OnnxModel(path, args.runtime)
        loaded = time.perf_counter()
        completions = Generator(model, tokenizer).generate(prompts, args.max_new_tokens, sampling, seed=args.seed,
                                                           stop=args.stop)
    _print(completions, time.perf_counter() - loaded, f", {args.runtime}; loading took {loaded - start:.2f} s")
    return 0


def _cpu_matmul(device: str) -> str | None:
    """On a CPU, the faster fp32 GEMM backend here, as the trainer's cpu.matmul = auto picks it (measured once
    per machine and cached)."""
    if not device.startswith("cpu"):
        return None
    from scalelm.train.peak import fastest_cpu_matmul

    return fastest_cpu_matmul("fp32")


def _print(completions, seconds: float, note: str = "") -> None:
    """The texts on stdout, one per line; the count and rate on stderr."""
    for completion in completions:
        print(completion.text)
    tokens = sum(len(c.tokens) for c in completions)
    print(f"generated {tokens} tokens for {len(completions)} prompt(s) in {seconds:.2f} s "
          f"({tokens / max(seconds, 1e-9):.1f} tokens/s{note})", file=sys.stderr)


def _generate_tp(args, argv: list[str], prompts: list[str], sampling) -> int:
    """Tensor-parallel generation: the parent checks the model splits and re-executes itself under torchrun; each
    rank generates the same tokens from its share of the model, and rank 0 prints them."""
    from scalelm.infer.tp import check_run_tp, generate_tp

    if not is_launched():
        check_run_tp(args.path, args.nproc)  # fail here, not in N processes
        exec_torchrun(args.nproc, "generate", pop_nproc(argv)[1])  # the ranks know they are launched
    start = time.perf_counter()
    completions = generate_tp(args.path, prompts, args.device, args.compile, max_new_tokens=args.max_new_tokens,
                              sampling=sampling, seed=args.seed, stop=args.stop, use_cache=not args.no_cache)
    if os.environ.get("RANK", "0") == "0":
        _print(completions, time.perf_counter() - start,
               f", {os.environ.get('WORLD_SIZE', '1')} tensor-parallel processes, loading included")
    return 0


def _speculative(args, model, tokenizer, prompts: list[str], sampling):
    from scalelm.infer.load import load_for_inference
    from scalelm.infer.speculative import speculative_generate

    if len(prompts) != 1:
        raise UsageError("--draft decodes one prompt at a time; give a single --prompt")
    draft, draft_tokenizer = load_for_inference(args.draft, args.device)
    completion, stats = speculative_generate(model, draft, tokenizer, prompts[0], args.max_new_tokens,
                                             k=args.draft_tokens, stop=args.stop, sampling=sampling, seed=args.seed,
                                             draft_tokenizer=draft_tokenizer)
    print(f"speculative: {stats.accepted}/{stats.proposed} draft tokens accepted ({stats.acceptance_rate:.0%}), "
          f"{stats.target_forwards} target forwards", file=sys.stderr)
    return completion


def main_eval(argv: list[str]) -> int:
    p = CliParser(prog="scalelm eval", description="Validation loss, perplexity and bits per token of a checkpoint, "
                  "as the trainer measures them.")
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--data", default=None, help="prepared dataset directory (default: the run's)")
    p.add_argument("--json", action="store_true", help="one JSON object: val_loss, perplexity, bits_per_token, tokens")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from scalelm.infer.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.path, args.data, args.device)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"val loss {result.val_loss:.4f}, perplexity {result.perplexity:.2f}, "
              f"{result.bits_per_token:.3f} bits/token over {result.tokens:,} tokens")
    return 0
