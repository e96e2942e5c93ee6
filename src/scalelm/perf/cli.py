"""`scalelm plan`, `scalelm plan evaluate`, `scalelm hw`, `scalelm calibrate`: argv in, exit code out.

Each entry point parses its own argv; bad input, argparse's usage errors included, prints one line `error: ...` to
stderr and returns 2; -h/--help anywhere prints the help and exits 0 (argparse's SystemExit, which `scalelm.cli.main`
turns into the exit code).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import replace

from scalelm.model.counting import num_params
from scalelm.model.presets import PRESETS, get_preset
from scalelm.perf import report
from scalelm.perf.evaluate import THROUGHPUT, RowError, evaluate_file, to_json
from scalelm.perf.frameworks import FP8_RECIPES, NAMES, Features, build_framework
from scalelm.perf.hardware import HardwareError, catalog, load_hardware, local_hardware_path
from scalelm.perf.hetero import plan_heterogeneous
from scalelm.perf.layout import Layout, LayoutError, check_layout
from scalelm.perf.planner import RANK_BY, search
from scalelm.perf.run import estimate_run
from scalelm.perf.step import predict_step
from scalelm.perf.uncertainty import group_key, interval, shipped_residuals
from scalelm.usage import CliParser, UsageError


def _entry_point(main):
    """argv in, exit code out: a usage mistake (CliParser) prints its one line and returns 2; and when
    `scalelm plan ... | head` closes stdout early, stop printing and exit 0 without a traceback."""

    @functools.wraps(main)
    def wrapper(argv: list[str]) -> int:
        try:
            return main(argv)
        except UsageError as exc:
            return _fail(str(exc))
        except BrokenPipeError:
            # Point stdout at /dev/null so the interpreter's final flush does not raise again.
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            except (OSError, ValueError, AttributeError):  # stdout replaced by a non-file (tests)
                pass
            return 0

    return wrapper


def _fail(msg: str) -> int:
    sys.stderr.write(f"error: {msg}\n")
    return 2


def _count(minimum: int, kind: type = int):
    """An argparse type: a number of `kind` that is at least `minimum` (0 GPUs or -5 tokens is a typo, not a plan)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"needs a number, got {text!r}") from None
        if not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"needs a number ≥ {minimum}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _plan_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="scalelm plan", description="Predict memory, time, cost and energy of training runs and "
                   "rank the parallel layouts. `scalelm plan evaluate RUNS.csv` compares with published runs.")
    p.add_argument("--model", default="gpt2-124m", help=f"preset: {', '.join(PRESETS)}")
    for name in ("n-layer", "d-model", "n-head", "n-kv-head", "d-ff", "vocab-size"):
        p.add_argument(f"--{name}", type=_count(1), help="override the preset's shape")
    p.add_argument("--gpu", action="append", metavar="NAME[:COUNT]",
                   help="accelerator from `scalelm hw list` (default a100-80gb); repeat as NAME:COUNT for a "
                   "heterogeneous cluster (one pipeline, stages split by speed)")
    p.add_argument("--hardware", help="hardware name, TOML file, or `local` (written by `scalelm calibrate`)")
    p.add_argument("--inter-node", help="inter-node fabric key (networks in `scalelm hw list`)")
    p.add_argument("--gpus", type=_count(1), help="number of devices (default: one node)")
    p.add_argument("--seq", type=_count(1), help="sequence length (default: the model's max_seq_len)")
    p.add_argument("--global-batch", type=_count(1), help="sequences per optimizer step (default: one per device)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp8", "fp32"))
    p.add_argument("--framework", default="scalelm", choices=sorted(NAMES), help="software profile")
    p.add_argument("--framework-year", type=_count(1), help="release year (Megatron before 2023: no flash attention)")
    p.add_argument("--fp8-recipe", choices=FP8_RECIPES, help="fp8 scaling: delayed (Transformer Engine) or current")
    for name, what in (("flash-attention", "fused attention kernel"), ("compile", "torch.compile of the model"),
                       ("tp-overlap", "TP communication overlapped with GEMMs (async TP)"),
                       ("dp-overlap", "gradient/ZeRO communication overlapped with compute"),
                       ("pp-overlap", "pipeline sends overlapped with compute"),
                       ("activation-offload", "saved activations kept in host memory"),
                       ("reshard-after-forward", "ZeRO-3 frees gathered weights after the forward and re-gathers")):
        dest = name.replace("-", "_")
        p.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=what)
        p.add_argument(f"--no-{name}", dest=dest, action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--distributed-optimizer", action="store_true", default=None,
                   help="shard optimizer states over data parallel (ZeRO-1) when --zero is not given")
    p.add_argument("--tokens", type=_count(1, float), help="tokens to train (default: 20 per parameter, Chinchilla)")
    p.add_argument("--top", type=_count(1), default=5, help="layouts to print")
    p.add_argument("--rank-by", default="throughput", choices=RANK_BY)
    for name in ("tp", "pp", "dp", "cp", "zero", "micro-batch", "vpp"):
        p.add_argument(f"--{name}", type=_count(0 if name == "zero" else 1), help="fix this part of the layout")
    p.add_argument("--recompute", choices=("none", "selective", "full"))
    p.add_argument("--schedule", choices=("1f1b", "interleaved", "gpipe", "zb-h1", "zb-h2"))
    p.add_argument("--sp", dest="sequence_parallel", action="store_true", default=None, help="sequence parallel")
    p.add_argument("--no-sp", dest="sequence_parallel", action="store_false")
    p.add_argument("--offload", action="store_true", help="optimizer states on the host (ZeRO-Offload)")
    p.add_argument("--optimizer", choices=("adamw", "muon"),
                   help="muon adds Newton-Schulz GEMMs to the step and needs whole matrices (tp 1, zero <= 1)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="DIR", help="write memory-breakdown and pipeline-timeline PNGs here")
    return p


def _model(args):
    cfg = get_preset(args.model)
    over = {"n_layer": args.n_layer, "d_model": args.d_model, "n_head": args.n_head, "n_kv_head": args.n_kv_head,
            "d_ff": args.d_ff, "vocab_size": args.vocab_size}
    over = {k: v for k, v in over.items() if v is not None}
    if "d_model" in over or "n_head" in over:
        over.setdefault("head_dim", None)
    cfg = replace(cfg, **over)
    cfg.validate()
    return cfg


def _gpu_groups(args) -> list[tuple[str, int | None]]:
    """--gpu values as (name, count or None); a count needs the NAME:COUNT form with a positive integer."""
    groups = []
    for value in args.gpu or []:
        name, _, count = value.partition(":")
        if count and not (count.isdigit() and int(count) > 0):
            raise UsageError(f"--gpu {value}: the count after ':' must be a positive integer, e.g. a100-80gb:64")
        groups.append((name, int(count) if count else None))
    if len(groups) > 1 and any(c is None for _, c in groups):
        raise UsageError("several --gpu values make a heterogeneous cluster: give each a count, "
                         "e.g. --gpu a100-80gb:64 --gpu h100-sxm-80gb:32")
    return groups


def _hardware(args, gpu: str | None = None):
    if args.hardware and gpu:
        hw = load_hardware(args.hardware)
        if hw.key != gpu:
            raise HardwareError(f"--gpu {gpu} contradicts --hardware {args.hardware} (which is {hw.key}); "
                                "pass one of them")
    else:
        hw = load_hardware(args.hardware or gpu or "a100-80gb")
    return hw.with_network(args.inter_node) if args.inter_node else hw


def _framework(args):
    feats = Features(name=args.framework, year=args.framework_year, zero=args.zero,
                     distributed_optimizer=args.distributed_optimizer, flash_attention=args.flash_attention,
                     compile=args.compile, fp8_recipe=args.fp8_recipe, tp_overlap=args.tp_overlap,
                     dp_overlap=args.dp_overlap, pp_overlap=args.pp_overlap,
                     activation_offload=args.activation_offload, reshard_after_forward=args.reshard_after_forward)
    return build_framework(feats)


def _interval(hw, res) -> dict | None:
    """The 80% interval of tokens/s per device for a predicted layout (catalogued accelerators only: a calibrated
    or hand-written file has no cross-validated runs behind it)."""
    if hw.efficiency.matmul_kernel is None:
        return None
    band = interval(res.tokens_per_s_per_device, shipped_residuals(), group_key(hw.key, res.layout))
    if band is None:
        return None
    lo, hi, used, n = band
    return {"tokens_per_s_per_device": [lo, hi], "step_time_s": [res.step_time_s * res.tokens_per_s_per_device / hi,
                                                                  res.step_time_s * res.tokens_per_s_per_device / lo],
            "from": f"{used} ({n} cross-validated runs)"}


def _plan_heterogeneous(args, cfg, groups) -> int:
    if args.tp or args.pp or args.dp or args.cp or args.zero is not None or args.micro_batch:
        return _fail("a heterogeneous plan chooses each group's layout; drop --tp/--pp/--dp/--cp/--zero/--micro-batch")
    hws = [(_hardware(argparse.Namespace(hardware=None, inter_node=args.inter_node), name), n) for name, n in groups]
    n = sum(c for _, c in hws)
    seq = args.seq or cfg.max_seq_len
    gbs = args.global_batch or n
    plans = plan_heterogeneous(cfg, hws, seq, gbs, args.precision, _framework(args))
    missing = [p.hardware for p in plans if p.result is None]
    if missing:
        which = f"the {missing[0]} group" if len(missing) == 1 else f"the groups {', '.join(missing)}"
        return _fail(f"no layout of its layers fits {which} at seq {seq}, global batch {gbs}; add devices, "
                     "lower --seq/--global-batch, or try --precision fp8")
    step = max(p.result.step_time_s for p in plans)
    tok = gbs * seq / step / n
    if args.json:
        print(json.dumps({"model": cfg.preset, "params": num_params(cfg), "devices": n, "seq_len": seq,
                          "global_batch": gbs, "step_time_s": step, "tokens_per_s_per_device": tok,
                          "groups": [p.to_dict() for p in plans]}, indent=2))
        return 0
    print(f"{cfg.preset or 'custom'}: {num_params(cfg) / 1e9:.3g}B params, seq {seq}, global batch {gbs} on "
          + " + ".join(f"{c} x {hw.key}" for hw, c in hws) + " as one pipeline, stages split by speed")
    rows = [[p.hardware, p.devices, p.layers, p.result.layout.short(), p.result.layout.zero,
             p.result.layout.micro_batch, f"{p.result.step_time_s:.3f}", f"{p.result.peak_mem_gib:.1f}",
             p.result.bottleneck] for p in plans]
    print(report.table(["group", "devices", "layers", "layout", "zero", "mb", "step_s", "mem_GiB", "bottleneck"],
                       rows, "lrrlrrrrl"))
    print(f"\nstep {step:.3f} s (the slowest group), {tok:,.0f} tokens/s per device; the transfers between groups "
          "are not modelled")
    return 0


@_entry_point
def main_plan(argv: list[str]) -> int:
    if argv and argv[0] == "evaluate":
        return main_evaluate(argv[1:])
    args = _plan_parser().parse_args(argv)
    try:
        cfg = _model(args)
        groups = _gpu_groups(args)
        if len(groups) > 1:
            if args.hardware or args.gpus:
                return _fail("a heterogeneous cluster takes its devices from --gpu NAME:COUNT; drop --hardware/--gpus")
            return _plan_heterogeneous(args, cfg, groups)
        gpu, count = groups[0] if groups else (None, None)
        if count and args.gpus and count != args.gpus:
            return _fail(f"--gpu {gpu}:{count} contradicts --gpus {args.gpus}; pass one count")
        hw = _hardware(args, gpu)
        n = count or args.gpus or hw.node.gpus_per_node
        seq = args.seq or cfg.max_seq_len
        gbs = args.global_batch or n
        if n < 1 or seq < 1 or gbs < 1:
            return _fail("--gpus, --seq and --global-batch must be positive")
        if hw.nodes and n > hw.nodes * hw.node.gpus_per_node:
            return _fail(f"{hw.name} has {hw.nodes * hw.node.gpus_per_node} devices; lower --gpus")
        fw = _framework(args)
        if args.distributed_optimizer and args.zero is None:
            args.zero = 1
        fixed = {k: v for k, v in (("tp", args.tp), ("pp", args.pp), ("cp", args.cp), ("zero", args.zero),
                                   ("micro_batch", args.micro_batch), ("recompute", args.recompute),
                                   ("sequence_parallel", args.sequence_parallel), ("schedule", args.schedule),
                                   ("optimizer", args.optimizer))
                 if v is not None}
        if args.tp and args.pp:
            # A fully specified layout: predict it (and say why it is impossible, if it is).
            dp = args.dp or max(1, n // (args.tp * args.pp * (args.cp or 1)))
            vpp = args.vpp or 1
            lo = Layout(tp=args.tp, pp=args.pp, dp=dp, cp=args.cp or 1, zero=args.zero or 0,
                        micro_batch=args.micro_batch or 1, vpp=vpp,
                        schedule=args.schedule or ("interleaved" if vpp > 1 else "1f1b"),
                        sequence_parallel=bool(args.sequence_parallel), recompute=args.recompute or "none",
                        precision=args.precision, offload=args.offload, optimizer=args.optimizer or "adamw")
            check_layout(cfg, lo, n, gbs, seq)
            results, considered, fitting = [predict_step(cfg, hw, lo, seq, gbs, fw)], 1, 1
        else:
            plan = search(cfg, hw, n, seq, gbs, args.precision, fw, args.top, args.rank_by, fixed)
            results, considered, fitting = plan.results, plan.considered, plan.fitting
            if not results:
                return _fail(f"no layout of {cfg.preset or 'the model'} fits {n} x {hw.key} "
                             f"({hw.accelerator.hbm_gib:g} GiB) at seq {seq}, global batch {gbs}; "
                             "add devices, lower --seq/--global-batch, or try --precision fp8")
    except (HardwareError, LayoutError, RowError, ValueError, KeyError) as exc:
        return _fail(str(exc).strip("'\""))
    band = _interval(hw, results[0])
    tokens = args.tokens or 20.0 * num_params(cfg)
    best = results[0]
    run = estimate_run(cfg, hw, best, seq, gbs, tokens)
    if args.plot:
        from scalelm.perf.plots import plot_plan

        try:
            paths = plot_plan(results, args.plot)
        except ImportError:
            return _fail("--plot needs matplotlib: pip install 'scalelm[plot]'")
    if args.json:
        out = {"model": cfg.preset, "params": num_params(cfg), "hardware": hw.key, "devices": n, "seq_len": seq,
               "global_batch": gbs, "considered": considered, "fitting": fitting,
               "layouts": [{"layout": r.layout.to_dict(), "step_time_s": r.step_time_s,
                            "tokens_per_s_per_device": r.tokens_per_s_per_device, "mfu": r.mfu, "hfu": r.hfu,
                            "peak_mem_gib": r.peak_mem_gib, "fits": r.fits, "bottleneck": r.bottleneck,
                            "time_s": r.time_s, "hidden_s": r.hidden_s, "memory_gib": r.memory_gib()}
                           for r in results],
               "interval_80": band, "run": run.to_dict()}
        print(json.dumps(out, indent=2))
        return 0
    print(f"{cfg.preset or 'custom'}: {num_params(cfg) / 1e9:.3g}B params, seq {seq}, global batch {gbs} on "
          f"{n} x {hw.key} ({hw.node.gpus_per_node}/node, {hw.network.key}); {considered:,} layouts considered, "
          f"{fitting:,} fit")
    print(report.table(report.PLAN_COLUMNS, report.plan_rows(results), "rllrrlrrrrrrrl"))
    print()
    print(f"best: {best.layout.short()}  zero {best.layout.zero}  micro-batch {best.layout.micro_batch} "
          f"({best.microbatches} per step)  MFU {best.mfu:.3f}  HFU {best.hfu:.3f}")
    if band:
        (lo, hi), (s_lo, s_hi) = band["tokens_per_s_per_device"], band["step_time_s"]
        print(f"80% interval: {lo:,.0f}-{hi:,.0f} tokens/s per device, step {s_lo:.3g}-{s_hi:.3g} s "
              f"(errors of {band['from']})")
    print(report.breakdown(best))
    print(report.run_summary(run, hw))
    if args.plot:
        print("plots: " + ", ".join(paths))
    return 0


@_entry_point
def main_evaluate(argv: list[str]) -> int:
    p = CliParser(prog="scalelm plan evaluate", description="Predict each published run of a CSV (runs or memory "
                   "schema) and report the error; --cv source refits the fitted knobs without each source in turn.")
    p.add_argument("file", help="CSV with the runs schema (tokens_per_s_per_gpu) or memory schema (peak_mem_gib)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cv", choices=("source",), help="leave-one-source-out cross-validation")
    p.add_argument("--write-fit", metavar="FILE", help="with --cv source on a runs CSV: fit the knobs on all rows and "
                   "write them with the cross-validated errors (the format of the shipped fit.toml)")
    args = p.parse_args(argv)
    if args.write_fit and not args.cv:
        return _fail("--write-fit needs --cv source (the intervals come from the cross-validated errors)")
    folds = None
    try:
        if args.cv:
            from scalelm.perf.fit import cross_validate_file, write_fit

            kind, rows, results, summary, folds = cross_validate_file(args.file)
            if args.write_fit:
                if kind != THROUGHPUT:
                    return _fail("--write-fit needs a runs CSV (tokens_per_s_per_gpu); memory is not fitted")
                write_fit(args.write_fit, rows, results)
        else:
            kind, results, summary = evaluate_file(args.file)
    except FileNotFoundError:
        return _fail(f"{args.file} does not exist; pass a CSV of the runs or memory schema")
    except (RowError, UnicodeDecodeError) as exc:
        return _fail(f"{args.file}: {exc}")
    if args.json:
        out = to_json(kind, results, summary)
        if folds is not None:
            out["cv"] = {"by": "source", "knobs_by_left_out_source": folds}
        print(json.dumps(out, indent=2))
    else:
        print(report.evaluate_table(kind, results))
        warned = [(r.id, r.extra["framework_warning"]) for r in results if r.extra and "framework_warning" in r.extra]
        for rid, text in warned:
            print(f"warning: {rid}: {text}")
        print()
        print(report.summary_line(kind, summary))
        if folds is not None:
            print("cross-validated: each source predicted with the knobs fitted on the others (" +
                  ("nothing is fitted for memory" if kind != THROUGHPUT else
                   "; ".join(f"{src[:70]}: " + " ".join(f"{k} {v:g}" for k, v in kn.items())
                             for src, kn in folds.items())) + ")")
        if args.write_fit:
            print(f"wrote {args.write_fit}")
    return 0


@_entry_point
def main_hw(argv: list[str]) -> int:
    p = CliParser(prog="scalelm hw", description="List or show the hardware catalog.")
    sub = p.add_subparsers(dest="cmd", metavar="list|show", required=True, parser_class=CliParser)
    sub.add_parser("list", help="all built-in accelerators and clusters")
    show = sub.add_parser("show", help="one hardware entry in full")
    show.add_argument("name", help="name, TOML file, or `local`")
    args = p.parse_args(argv)
    try:
        if args.cmd == "list":
            entries = [(name, load_hardware(name)) for name in catalog()]
            if local_hardware_path().exists():
                entries.append(("local", load_hardware("local")))
            print(report.hardware_list(entries))
            from scalelm.perf.hardware import networks

            print("\ninter-node fabrics: " + ", ".join(sorted(networks())))
        else:
            print(report.hardware_show(load_hardware(args.name)))
    except HardwareError as exc:
        return _fail(str(exc))
    return 0


def _unwritable(path: str) -> str:
    """Why `path` cannot be written as a file ('' if it can): a directory, or a parent that cannot be made or
    written."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        return "it is a directory"
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        return exc.strerror or str(exc)
    return "" if os.access(parent, os.W_OK) else "its directory is not writable"


@_entry_point
def main_calibrate(argv: list[str]) -> int:
    p = CliParser(prog="scalelm calibrate", description="Measure this machine (matmul by shape, memory bandwidth, "
                   "gloo collectives between local processes) and write a hardware TOML for --hardware local.")
    p.add_argument("--out", help=f"where to write (default {local_hardware_path()})")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (~10 s)")
    p.add_argument("--no-collectives", action="store_true", help="skip the 2-process gloo measurement")
    args = p.parse_args(argv)
    out = args.out or local_hardware_path()
    problem = _unwritable(out)
    if problem:  # before minutes of measuring, not after
        return _fail(f"cannot write the hardware file {out}: {problem}; pass --out to a writable file path")
    try:
        from scalelm.calibrate import calibrate, write_toml
    except ImportError as exc:  # pragma: no cover - torch missing
        return _fail(f"calibrate needs PyTorch ({exc}); pip install torch")
    try:
        result = calibrate(quick=args.quick, collectives=not args.no_collectives)
    except ImportError as exc:
        return _fail(f"calibrate needs PyTorch ({exc}); pip install torch")
    path = write_toml(result, out)
    print(f"wrote {path}")
    print(report.hardware_show(load_hardware(str(path))))
    return 0
