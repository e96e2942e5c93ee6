"""`scalelm quantize`, `scalelm prune` and `scalelm distill`: argv in, exit code out.

Option mistakes (3 bits, a sparsity of 1.5, a student larger than its teacher) are one line `error: ...` and
exit code 2, raised before anything is loaded or written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from scalelm.launch import exec_torchrun, is_launched, pop_nproc
from scalelm.usage import CliParser, UsageError


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _dense_source(path: str):
    """(checkpoint directory, dense model) of a run or checkpoint; a quantized one cannot be compressed again."""
    from scalelm.compress.checkpoint import is_quantized
    from scalelm.train.checkpoint import load_model, resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    if is_quantized(checkpoint):
        raise UsageError(f"{path} is already quantized; pass the run or checkpoint it was made from")
    return checkpoint, load_model(checkpoint)


def main_quantize(argv: list[str]) -> int:
    p = CliParser(prog="scalelm quantize", description="Weight-only quantization of a trained model: int8 per "
                  "output channel or int4 per group of input weights; the token embedding is stored in int8 rows. "
                  "The checkpoint written loads with scalelm.load, `scalelm generate` and `scalelm eval`.")
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--bits", type=int, required=True, help="8 or 4")
    p.add_argument("--group-size", type=int, default=None, help="int4 only: input weights per scale and zero, "
                   "32, 64 or 128 (default 32)")
    p.add_argument("--out", required=True, help="checkpoint directory to write (new)")
    args = p.parse_args(argv)
    from scalelm.compress.checkpoint import check_new_out, save_quantized
    from scalelm.compress.quantize import QuantizeError, check_options, model_bytes, quantize_tensors, swap_quantized

    try:
        group_size = check_options(args.bits, args.group_size)
    except QuantizeError as e:
        raise UsageError(str(e)) from None
    check_new_out(args.out)
    checkpoint, model = _dense_source(args.path)
    dense_memory = model_bytes(model)
    try:
        tensors, spec = quantize_tensors(model, args.bits, group_size)
    except QuantizeError as e:
        raise UsageError(str(e)) from None
    out = save_quantized(args.out, tensors, spec, model.cfg, checkpoint)
    memory = model_bytes(swap_quantized(model, tensors, spec))
    disk, dense_disk = (out / "model.safetensors").stat().st_size, (checkpoint / "model.safetensors").stat().st_size
    form = f"int{args.bits}" + (f", groups of {group_size}" if group_size else " per channel")
    print(f"wrote {out}: {form}; weights {_mb(disk)} on disk ({dense_disk / disk:.2f}x smaller than "
          f"{_mb(dense_disk)}), {_mb(memory)} in memory ({dense_memory / memory:.2f}x smaller than "
          f"{_mb(dense_memory)})")
    return 0


def _calibration(cfg, model, batches: int, rows: int = 16):
    """`batches` batches of `rows` training windows (the run's data and sequence length), for Wanda."""
    from scalelm.data import BatchLoader, default_dataset, open_split

    data_dir = Path(cfg.data.path) if cfg.data.path else default_dataset()
    loader = BatchLoader(open_split(data_dir, "train"), min(cfg.train.seq_len, model.cfg.max_seq_len), rows,
                         cfg.seed + 1)
    return [loader.next_batch()[0] for _ in range(batches)]


def _run_config(checkpoint: Path, overrides: dict | None = None):
    """The config of the run a checkpoint belongs to (defaults where it has none), with `overrides` on top."""
    from scalelm.config import build_config, load_toml
    from scalelm.infer.evaluate import run_dir_of

    config_file = run_dir_of(checkpoint) / "config.toml"
    return build_config(load_toml(config_file) if config_file.is_file() else {}, overrides)


def main_prune(argv: list[str]) -> int:
    p = CliParser(prog="scalelm prune", description="Prune a trained model's block linear layers: magnitude "
                  "or Wanda scores (|W|·‖X‖ from calibration batches of the training data), unstructured or 2:4, "
                  "optionally followed by a recovery fine-tune that keeps the masks. Other arguments are "
                  "`scalelm train` keys (--SECTION.KEY VALUE) for the recovery run, e.g. --train.compile false.")
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--method", required=True, help="magnitude or wanda")
    p.add_argument("--sparsity", type=float, default=None, help="share of each row's weights to zero, 0 <= S < 1")
    p.add_argument("--pattern", default=None, help="2:4 (2 of every 4 consecutive input weights zeroed)")
    p.add_argument("--calibration-batches", type=int, default=8, help="Wanda: batches of 16 training windows")
    p.add_argument("--recover-steps", type=int, default=0, help="fine-tune this many steps with the masks kept "
                   "(--out is then a run directory; the same command resumes it)")
    p.add_argument("--recover-lr-scale", type=float, default=0.1, help="the recovery's peak learning rates "
                   "(optim.lr and optim.muon_lr) as a share of the run's (default 0.1)")
    p.add_argument("--out", required=True, help="directory to write (new)")
    args, rest = p.parse_known_args(argv)
    from scalelm.compress.prune import PruneError, check_options
    from scalelm.config import build_config, parse_overrides

    args.overrides = parse_overrides(rest)
    build_config({}, args.overrides)  # an unknown key (a mistyped option) is named here
    if args.overrides and not args.recover_steps:
        raise UsageError(f"{rest[0]}: `scalelm train` keys apply to the recovery run only; add --recover-steps N")

    try:
        check_options(args.method, args.sparsity, args.pattern)
    except PruneError as e:
        raise UsageError(str(e)) from None
    if args.recover_steps < 0 or args.calibration_batches < 1 or args.recover_lr_scale <= 0:
        raise UsageError("--recover-steps must be >= 0, --calibration-batches >= 1 and --recover-lr-scale > 0")
    options = {"method": args.method, "sparsity": args.sparsity, "pattern": args.pattern,
               "calibration_batches": args.calibration_batches, "source": str(args.path)}
    out = Path(args.out)
    resuming = args.recover_steps > 0 and (out / "prune.json").is_file()
    if resuming and json.loads((out / "prune.json").read_text()) != options:
        raise UsageError(f"--out {out} holds a recovery with other pruning options; choose a new directory")
    from scalelm.compress.checkpoint import check_new_out

    if not resuming:
        check_new_out(out)
    return _prune(args, options, out, resuming)


def _prune(args, options: dict, out: Path, resuming: bool) -> int:
    from safetensors.torch import load_file, save_file

    from scalelm.compress.prune import PruneError, apply_masks, prune_masks, sparsity_of
    from scalelm.train.checkpoint import unique_state

    checkpoint, model = _dense_source(args.path)
    cfg = _run_config(checkpoint, args.overrides)
    if resuming:
        masks = {k: v.bool() for k, v in load_file(str(out / "masks.safetensors")).items()}
    else:
        calibration = _calibration(cfg, model, args.calibration_batches) if args.method == "wanda" else None
        try:
            masks = prune_masks(model, args.method, args.sparsity, args.pattern, calibration)
        except PruneError as e:
            raise UsageError(str(e)) from None
    apply_masks(model, masks)
    names = list(masks)
    described = f"{args.method}, {args.pattern or f'sparsity {args.sparsity:g}'}"

    def fill(directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in masks.items()}, str(directory / "masks.safetensors"))
        (directory / "prune.json").write_text(json.dumps(options, indent=1))

    if args.recover_steps == 0:
        from scalelm.compress.checkpoint import copy_source_files, write_directory

        def fill_checkpoint(directory: Path) -> None:
            fill(directory)
            save_file(unique_state(model), str(directory / "model.safetensors"))
            (directory / "model.json").write_text(json.dumps(model.cfg.to_dict(), indent=1))
            copy_source_files(checkpoint, directory)

        write_directory(out, fill_checkpoint)
        print(f"wrote {out}: {described}; {sparsity_of(model, names):.1%} of the block weights are zero")
        return 0
    if not resuming:
        from scalelm.compress.checkpoint import write_directory

        write_directory(out, fill)
    return _recover(args, cfg, model, masks, out, described)


def _recover(args, cfg, model, masks, out: Path, described: str) -> int:
    from scalelm.compress.recover import recover
    from scalelm.train.checkpoint import load_model, unique_state

    cfg.out = str(out)
    cfg.train.steps = args.recover_steps
    cfg.train.time_budget_min = 0.0
    cfg.train.eval_every = 0
    cfg.optim.lr *= args.recover_lr_scale
    cfg.optim.muon_lr *= args.recover_lr_scale
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, args.recover_steps // 10)
    cfg.checkpoint.resume = True
    end = recover(cfg, unique_state(model), masks)
    recovered = load_model(out)
    kept = all(bool((recovered.get_submodule(n).weight[~m] == 0).all()) for n, m in masks.items())
    print(f"done: {described}, {args.recover_steps} recovery steps, val loss {end['val_loss']:.4f}, masks "
          f"{'kept' if kept else 'NOT kept'}; run directory {out}")
    return 0 if kept else 1


def main_distill(argv: list[str]) -> int:
    p = CliParser(prog="scalelm distill", description="Train a student on a teacher's softened distribution "
                  "(temperature T, weight alpha against the data's own loss) with the normal trainer: checkpoints, "
                  "resume, metrics and data-parallel layouts (--nproc N) as in `scalelm train`. Other arguments "
                  "are `scalelm train` keys (--SECTION.KEY VALUE) for the student's run.")
    p.add_argument("--teacher", required=True, help="run directory or checkpoint of the teacher")
    p.add_argument("--student", required=True, help="model preset name, or a run config .toml file")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher term (0 = data only)")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of both distributions")
    nproc, argv = pop_nproc(argv)
    args, rest = p.parse_known_args(argv)
    from scalelm.compress.distill import DistillError, check_pair, distill
    from scalelm.config import build_config, load_toml, parse_overrides

    overrides = parse_overrides(rest)
    student = Path(args.student)
    if args.student.endswith(".toml") or student.is_file():
        values = load_toml(student)
    else:
        values = {"model.preset": args.student}
    if "config" in overrides:
        raise UsageError("give the student's config file as --student FILE.toml, not --config")
    teacher_ckpt, teacher_cfg = _teacher(args.teacher)
    if "data.path" not in values and "data.path" not in overrides and teacher_cfg.data.path:
        values["data.path"] = teacher_cfg.data.path  # the teacher's data unless told otherwise
    cfg = build_config(values, overrides)
    teacher_model = _teacher_model_config(teacher_ckpt)
    try:
        check_pair(teacher_model, cfg.model, args.alpha, args.temperature, cfg.parallel.tp, cfg.parallel.pp)
    except DistillError as e:
        raise UsageError(str(e)) from None
    if nproc is not None and nproc > 1 and not is_launched():
        from scalelm.config import validate_parallel

        validate_parallel(cfg, nproc)
        exec_torchrun(nproc, "distill", argv)
    end = distill(cfg, teacher_ckpt, args.alpha, args.temperature)
    if os.environ.get("RANK", "0") == "0":
        print(f"done: step {end['step']}, val loss {end['val_loss']:.4f}, run directory {cfg.out}")
    return 0


def _teacher(path: str):
    from scalelm.train.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    return checkpoint, _run_config(checkpoint)


def _teacher_model_config(checkpoint: Path):
    from scalelm.model.config import ModelConfig

    return ModelConfig.from_dict(json.loads((checkpoint / "model.json").read_text()))
