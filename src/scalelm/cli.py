"""The `scalelm` command. Each subcommand parses its arguments and calls one plain function; errors that a
person can fix print one line and exit with code 2 (never a traceback)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scalelm.config import ConfigError

USAGE = """usage: scalelm COMMAND [ARGS]

commands:
  train      train a model (no arguments: shakespeare-char on the bundled corpus)
  prepare    text/JSONL files → token shards for training
  generate   continue a prompt with a trained run or checkpoint
  info       parameters, FLOPs/token and weight memory of a model preset
  report     PNG plots of a run's metrics
  plan       predict memory/time/cost of layouts on a cluster; `plan evaluate RUNS.csv`
  hw         list/show the hardware catalog
  calibrate  measure this machine and write a hardware file

`scalelm COMMAND --help` for details."""


class UsageError(Exception):
    pass


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_train(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        from scalelm.config import all_keys

        print("usage: scalelm train [--config FILE.toml] [--SECTION.KEY VALUE ...]\n\nkeys: " + ", ".join(all_keys()))
        return 0
    from scalelm.config import build_config, load_toml, parse_overrides

    overrides = parse_overrides(argv)
    file_values = load_toml(overrides.pop("config")) if "config" in overrides else {}
    cfg = build_config(file_values, overrides)
    from scalelm.train.run import train

    end = train(cfg)
    print(f"done: step {end['step']}, val loss {end['val_loss']:.4f}, run directory {cfg.out}")
    return 0


def cmd_prepare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scalelm prepare", description="Tokenize text into training shards.")
    p.add_argument("sources", nargs="+", help="text files, directories or JSONL files (with a 'text' field)")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="char")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 4096)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="tail share of the text kept for validation")
    args = p.parse_args(argv)
    from scalelm.data import prepare

    meta = prepare(args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction)
    counts = meta.get("tokens", meta.get("token_counts", {}))
    print(f"wrote {args.out}: vocab {meta['vocab_size']}, tokens {counts}; train with "
          f"`scalelm train --data.path {args.out}`")
    return 0


def cmd_generate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scalelm generate", description="Continue a prompt with a trained model.")
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0:
        raise UsageError("--max-new-tokens must be >= 0")
    import torch

    from scalelm.data import load_tokenizer
    from scalelm.model.sample import sample
    from scalelm.train.checkpoint import load_model, resolve_checkpoint

    ckpt = resolve_checkpoint(args.path)
    tok_dir = next((d for d in (ckpt / "tokenizer", ckpt.parent.parent / "tokenizer") if d.is_dir()), None)
    if tok_dir is None:
        raise UsageError(f"no tokenizer/ directory next to {ckpt}; was it written by `scalelm train`?")
    tokenizer = load_tokenizer(tok_dir)
    model = load_model(ckpt, device=args.device)
    try:
        ids = tokenizer.encode(args.prompt)
    except ValueError as e:
        raise UsageError(f"the prompt cannot be encoded by this run's tokenizer: {e}") from None
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out = sample(model, torch.tensor([ids], device=args.device), args.max_new_tokens, args.temperature,
                 args.top_k, generator=gen, vocab_limit=tokenizer.vocab_size)
    print(tokenizer.decode(out[0].tolist()))
    return 0


def cmd_info(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scalelm info", description="Size, FLOPs and weight memory of a preset.")
    p.add_argument("preset", nargs="?", default=None, help="preset name (or --model.preset)")
    p.add_argument("--model.preset", dest="preset_flag", default=None)
    p.add_argument("--seq", type=int, default=None, help="sequence length for FLOPs (default: the model's)")
    args = p.parse_args(argv)
    from scalelm.model import PRESETS, get_preset
    from scalelm.model.counting import flops_per_token, num_params, weight_bytes

    name = args.preset_flag or args.preset
    names = [name] if name else list(PRESETS)
    rows = []
    for n in names:
        try:
            cfg = get_preset(n)
        except KeyError as e:
            raise UsageError(e.args[0]) from None
        seq = args.seq or cfg.max_seq_len
        wb = weight_bytes(cfg)
        rows.append((n, num_params(cfg), num_params(cfg, embeddings=False), seq, flops_per_token(cfg, seq),
                     wb["fp32"], wb["bf16"], wb["int8"], wb["int4"]))
    from rich.console import Console
    from rich.table import Table

    table = Table(title="model presets (training FLOPs = 6·N_matmul + 12·L·T·H·d_head per token, no causal discount)")
    for col in ("preset", "params", "non-emb params", "seq", "train GFLOP/token", "fp32 GiB", "bf16 GiB",
                "int8 GiB", "int4 GiB"):
        table.add_column(col, justify="left" if col == "preset" else "right")
    for n, total, body, seq, fpt, w32, w16, w8, w4 in rows:
        table.add_row(n, f"{total:,}", f"{body:,}", str(seq), f"{fpt / 1e9:.4g}",
                      *(f"{b / 2**30:.3g}" for b in (w32, w16, w8, w4)))
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    return 0


def cmd_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scalelm report", description="Plot a run's metrics to PNG files.")
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    from scalelm.train.report import write_report

    for path in write_report(Path(args.run_dir)):
        print(f"wrote {path}")
    return 0


def _perf(name: str):
    def run(argv: list[str]) -> int:
        from scalelm.perf import cli as perf_cli

        return getattr(perf_cli, name)(argv)

    return run


COMMANDS = {
    "train": cmd_train, "prepare": cmd_prepare, "generate": cmd_generate, "info": cmd_info, "report": cmd_report,
    "plan": _perf("main_plan"), "hw": _perf("main_hw"), "calibrate": _perf("main_calibrate"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # `scalelm` alone trains the default model, like `scalelm train`
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        return _error(f"unknown command {argv[0]!r}" + (f"; did you mean {close[0]!r}?" if close else "") +
                      f" (commands: {', '.join(COMMANDS)})")
    try:
        return command(argv[1:])
    except FileNotFoundError as e:
        return _error(f"{e.strerror}: {e.filename}")
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact — run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, _user_errors()):
            return _error(str(e))
        raise


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors a person can fix. Looked up lazily so `scalelm plan` never imports torch just to catch them."""
    errors: list[type[Exception]] = [ConfigError, UsageError]
    for module, name in (("scalelm.data.errors", "DataError"), ("scalelm.train.checkpoint", "CheckpointError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)
