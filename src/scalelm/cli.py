"""The `scalelm` command. Each subcommand parses its arguments and calls one plain function; errors that a
person can fix, argparse's included, print one line `error: ...` and exit with code 2 (never a traceback or a
usage block); -h/--help anywhere shows the command's help and exits 0. Torch-free to import (`scalelm.perf.cli`
uses CliParser from here)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from scalelm.config import ConfigError
from scalelm.launch import exec_torchrun, is_launched, pop_count, pop_nproc
from scalelm.train.slurm import slurm_script
from scalelm.usage import HELP, CliParser, UsageError, is_number, wants_help

USAGE = """usage: scalelm COMMAND [ARGS]

commands:
  train      train a model (with no options: shakespeare-char on the bundled corpus); --nproc N runs torchrun
  slurm      write an sbatch script that trains on several nodes (srun + torchrun)
  prepare    text/JSONL files → token shards for training
  generate   continue prompts with a trained run or checkpoint (KV cache, batches, speculative, --nproc N)
  eval       validation loss, perplexity and bits per token of a checkpoint
  export     write a run in another format (`scalelm export --help` lists them)
  import     read a Hugging Face GPT-2/Llama directory into a scalelm model directory (`import hf DIR`)
  merge      fold a LoRA run's adapters into its base weights
  finetune-classify  train a classification head on labelled JSONL (text, label) from --init-from weights
  classify   predict labels of texts with a finetune-classify run
  serve      an OpenAI-compatible HTTP server for a run (batched; /v1/completions, /v1/chat/completions)
  info       parameters, FLOPs/token and weight memory of a model preset
  report     PNG plots of a run's metrics
  plan       predict memory/time/cost of layouts on a cluster; `plan evaluate RUNS.csv`
  hw         list/show the hardware catalog
  calibrate  measure this machine and write a hardware file
  quantize   weight-only int8/int4 checkpoint of a trained model (loads, generates and evaluates as usual)
  prune      magnitude or Wanda pruning (unstructured or 2:4), optional recovery fine-tune with masks kept
  distill    train a smaller student on a teacher's softened distribution

`scalelm COMMAND --help` for details."""

def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _expand_parallel(argv: list[str]) -> list[str]:
    """`--parallel auto` / `--parallel=auto` → `--parallel.auto true` (the planner picks the layout)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--parallel" or arg.startswith("--parallel="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if value != "auto":
                raise UsageError(f"--parallel takes only `auto` (got {value!r}); set degrees with --parallel.KEY VALUE")
            out += ["--parallel.auto", "true"]
            i += 1 if "=" in arg else 2
            continue
        out.append(arg)
        i += 1
    return out


def _source_model(file_values: dict, overrides: dict) -> dict:
    """The file's values under the --init-from source's model keys (train/init_from.py); torch only when set."""
    if not overrides.get("init_from", file_values.get("init_from")):
        return file_values
    from scalelm.train.init_from import with_source_model

    return with_source_model(file_values, overrides)


def cmd_train(argv: list[str]) -> int:
    if wants_help(argv):
        from scalelm.config import all_keys

        print("usage: scalelm train [--nproc N] [--max-restarts N] [--parallel auto] [--config FILE.toml] "
              "[--SECTION.KEY VALUE ...]\n\n"
              "--nproc N starts N processes with torchrun (the `parallel` section says how they share the work)\n"
              "--max-restarts N: when a process dies, torchrun restarts the group up to N times; each restart\n"
              "  resumes from the last checkpoint (set --checkpoint.every)\n"
              "--parallel auto lets the planner choose that layout for this hardware (= --parallel.auto true;\n"
              "  hardware: --parallel.hardware NAME|FILE, or the GPU's built-in file, or `scalelm calibrate`'s)\n"
              "boolean keys also take --KEY (true) and --no-KEY (false), e.g. --train.compile, --no-metrics.progress\n\n"
              "keys: " + ", ".join(all_keys()))
        return 0
    from scalelm.config import build_config, load_toml, parse_overrides, validate_parallel

    nproc, argv = pop_nproc(argv)
    max_restarts, argv = pop_count(argv, "--max-restarts", "a number of restarts (0 or more)")
    argv = _expand_parallel(argv)
    if ((nproc or 1) > 1 or max_restarts) and not is_launched():
        nproc = nproc or 1
        overrides = parse_overrides(argv)
        file_values = load_toml(overrides.pop("config")) if "config" in overrides else {}
        cfg = build_config(_source_model(file_values, overrides), overrides)
        if cfg.parallel.auto:  # plan once here; the ranks get the explicit layout
            from scalelm.train.forecast import PLANNED_ENV, launch_flags

            flags, line = launch_flags(cfg, nproc)
            print(line)
            argv = [*argv, *flags]
            os.environ[PLANNED_ENV] = "1"
        validate_parallel(cfg, nproc)  # fail here, not in N processes
        from scalelm.train.device import resolve_device
        from scalelm.train.fits import check_fits

        # A model too large for a rank is refused before N processes start (auto dtype: bf16, the smaller).
        check_fits(cfg, nproc, "bf16" if cfg.train.dtype == "auto" else cfg.train.dtype, resolve_device(cfg.device))
        exec_torchrun(nproc, "train", argv, max_restarts or 0)
    overrides = parse_overrides(argv)
    file_values = load_toml(overrides.pop("config")) if "config" in overrides else {}
    cfg = build_config(_source_model(file_values, overrides), overrides)
    from scalelm.train.run import train

    end = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns here; one line is enough
        print(f"done: step {end['step']}, val loss {end['val_loss']:.4f}, run directory {cfg.out}")
    return 0


def cmd_slurm(argv: list[str]) -> int:
    p = CliParser(
        prog="scalelm slurm", allow_abbrev=False, description="Write an sbatch script for a multi-node run (srun + "
        "torchrun c10d rendezvous). `scalelm train` arguments follow as --SECTION.KEY VALUE, or after --.")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, default=8, help="training processes per node (default 8)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs to request per node (default: "
                   "--nproc-per-node; 0 for CPU nodes)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per node (default 8 per process)")
    p.add_argument("--time", default="01:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--job-name", default="scalelm")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    p.add_argument("--script", default="train.sbatch", help="script to write (default train.sbatch; - = stdout); "
                   "--out is the run directory, passed to `scalelm train`")
    if any(arg in HELP for arg in argv):  # after `--` too: `scalelm train --help` makes no sbatch script
        p.print_help()
        return 0
    split = argv.index("--") if "--" in argv else len(argv)
    args, extra = p.parse_known_args(argv[:split])
    _check_train_args(extra, p)
    train_args = extra + argv[split + 1:]
    if args.nodes < 1 or args.nproc_per_node < 1:
        raise UsageError("--nodes and --nproc-per-node must be >= 1")
    from scalelm.config import build_config, load_toml, parse_overrides, validate_parallel

    overrides = parse_overrides(_expand_parallel(train_args))
    file_values = load_toml(overrides.pop("config")) if "config" in overrides else {}
    validate_parallel(build_config(file_values, overrides), args.nodes * args.nproc_per_node)
    gpus = args.nproc_per_node if args.gpus_per_node is None else args.gpus_per_node
    text = slurm_script(args.nodes, args.nproc_per_node, gpus, train_args, args.job_name, args.time, args.partition,
                        args.account, args.cpus_per_task, args.port,
                        args.script if args.script != "-" else "train.sbatch")
    if args.script == "-":
        print(text, end="")
    else:
        Path(args.script).write_text(text)
        print(f"wrote {args.script}: {args.nodes} node(s) × {args.nproc_per_node} processes; submit with "
              f"`sbatch {args.script}`")
    return 0


def _check_train_args(extra: list[str], parser: argparse.ArgumentParser) -> None:
    """What `scalelm slurm` did not recognise must be `scalelm train` arguments (--SECTION.KEY, --seed, --device,
    --out, --config, --parallel, --no-KEY and values); anything else is a mistyped slurm option."""
    import difflib

    from scalelm.config import TOP_LEVEL

    for arg in extra:
        if not arg.startswith("-") or is_number(arg):
            continue  # a value
        key = arg.lstrip("-").split("=", 1)[0]
        key = key[3:] if key.startswith("no-") else key
        if arg.startswith("--") and ("." in key or key.replace("-", "_") in TOP_LEVEL or key in ("config", "parallel")):
            continue  # checked by the config when the script is validated below
        options = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
        close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"unknown option {arg.split('=', 1)[0]} for `scalelm slurm`{hint} (`scalelm slurm --help` "
                         "lists them; `scalelm train` arguments go as --SECTION.KEY VALUE or after --)")


def cmd_prepare(argv: list[str]) -> int:
    p = CliParser(prog="scalelm prepare", description="Tokenize text into training shards.")
    p.add_argument("sources", nargs="+", help="text files, directories or JSONL files (with a 'text' field)")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="char")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 4096)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="tail share of the text kept for validation")
    args = p.parse_args(argv)
    from scalelm.data import prepare

    meta = prepare(args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction)
    counts = ", ".join(f"{name} {split['tokens']:,}" for name, split in meta["splits"].items())
    print(f"wrote {args.out}: {meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, tokens: {counts}; "
          f"train with `scalelm train --data.path {args.out} --model.vocab_size {64 * -(-meta['vocab_size'] // 64)}`")
    return 0


def cmd_info(argv: list[str]) -> int:
    p = CliParser(prog="scalelm info", description="Size, FLOPs and weight memory of a preset.")
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
    p = CliParser(prog="scalelm report", description="Plot a run's metrics to PNG files.")
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


EXPORTERS: dict[str, tuple[str, str]] = {}
"""`scalelm export FORMAT ...` → (module, function) of that format's exporter, each in the package that owns it."""
EXPORTERS["hf"] = ("scalelm.interop.cli", "main_export_hf")
EXPORTERS["onnx"] = ("scalelm.infer.onnx_export", "main_export_onnx")


def cmd_export(argv: list[str]) -> int:
    if not argv or argv[0] in HELP:
        print("usage: scalelm export FORMAT RUN_OR_CKPT --out PATH [options]\n\nformats: " + ", ".join(EXPORTERS) +
              "\n`scalelm export FORMAT --help` for a format's options")
        return 0
    if argv[0] not in EXPORTERS:
        raise UsageError(f"unknown export format {argv[0]!r}; choose one of: {', '.join(EXPORTERS)}")
    import importlib

    module, function = EXPORTERS[argv[0]]
    return getattr(importlib.import_module(module), function)(argv[1:])


def _interop(name: str):
    def run(argv: list[str]) -> int:
        from scalelm.interop import cli as interop_cli

        return getattr(interop_cli, name)(argv)

    return run


def _infer(name: str):
    def run(argv: list[str]) -> int:
        from scalelm.infer import cli as infer_cli

        return getattr(infer_cli, name)(argv)

    return run


def _serve(argv: list[str]) -> int:
    from scalelm.serve.cli import main_serve

    return main_serve(argv)


def _compress(name: str):
    def run(argv: list[str]) -> int:
        from scalelm.compress import cli as compress_cli

        return getattr(compress_cli, name)(argv)

    return run


COMMANDS = {
    "train": cmd_train, "slurm": cmd_slurm, "prepare": cmd_prepare, "generate": _infer("main_generate"),
    "eval": _infer("main_eval"), "export": cmd_export, "serve": _serve, "info": cmd_info, "report": cmd_report,
    "plan": _perf("main_plan"), "hw": _perf("main_hw"), "calibrate": _perf("main_calibrate"),
    "import": _interop("main_import"), "merge": _interop("main_merge"),
    "finetune-classify": _interop("main_finetune_classify"), "classify": _interop("main_classify"),
    "quantize": _compress("main_quantize"), "prune": _compress("main_prune"), "distill": _compress("main_distill"),
}


def main(argv: list[str] | None = None) -> int:
    """`scalelm ARGS` → exit code. Alone, or with -h/--help/help: the command list (it never starts a run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["help"] and argv[1:2] and argv[1] in COMMANDS:
        argv = [argv[1], "--help"]  # `scalelm help train`
    if not argv or argv[0] in (*HELP, "help"):
        print(USAGE)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        import difflib

        if argv[0].startswith("-"):
            return _error(f"{argv[0]} needs a command before it, e.g. `scalelm train {argv[0]} ...` "
                          f"(commands: {', '.join(COMMANDS)})")
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        return _error(f"unknown command {argv[0]!r}" + (f"; did you mean {close[0]!r}?" if close else "") +
                      f" (commands: {', '.join(COMMANDS)})")
    try:
        return command(argv[1:])
    except SystemExit as e:  # argparse after --help (0); kept inside so callers of main() get a code
        return e.code if isinstance(e.code, int) else _error(str(e.code)) if e.code else 0
    except FileNotFoundError as e:
        return _error(f"{e.strerror}: {e.filename}")
    except KeyboardInterrupt:
        # Only a training run has checkpoints to resume from.
        print("interrupted; the last checkpoint is intact — run the same command to resume" if argv[0] == "train"
              else "interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, _user_errors()):
            return _error(str(e))
        raise


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors a person can fix. Looked up lazily so `scalelm plan` never imports torch just to catch them."""
    errors: list[type[Exception]] = [ConfigError, UsageError]
    for module, name in (("scalelm.data.errors", "DataError"), ("scalelm.train.checkpoint", "CheckpointError"),
                         ("scalelm.infer.generate", "GenerationError"),
                         ("scalelm.compress.quantize", "QuantizeError"), ("scalelm.compress.prune", "PruneError"),
                         ("scalelm.compress.distill", "DistillError"), ("scalelm.model.hf_layout", "FormatError"),
                         ("scalelm.train.guard", "NonFiniteError"), ("scalelm.parallel.watchdog", "CollectiveTimeout")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)
