"""`scalelm export hf`, `scalelm import hf`, `scalelm merge`, `scalelm finetune-classify`, `scalelm classify`:
argv in, exit code out; each parses its arguments and calls one function of this package."""

from __future__ import annotations

from scalelm.usage import CliParser, UsageError, wants_help


def main_export_hf(argv: list[str]) -> int:
    p = CliParser(prog="scalelm export hf", description="Write a run or checkpoint as a Hugging Face directory "
                  "(GPT-2 or Llama layout, safetensors, tokenizer files); a LoRA run's adapters go to OUT/adapter "
                  "in the peft format.")
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--out", required=True, help="new directory to write")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="store the weights in this "
                   "precision (default: as saved)")
    args = p.parse_args(argv)
    from scalelm.interop.hf_export import ADAPTER_DIR, export_hf
    from scalelm.model.hf_layout import hf_family
    from scalelm.train.init_from import source_model_config

    out = export_hf(args.path, args.out, args.dtype)
    family = hf_family(source_model_config(out))
    adapter = f"; peft adapter in {out / ADAPTER_DIR}" if (out / ADAPTER_DIR).is_dir() else ""
    print(f"wrote {out}: Hugging Face {family} model{adapter}; load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def main_import(argv: list[str]) -> int:
    p = CliParser(prog="scalelm import", description="Read a local Hugging Face GPT-2 or Llama directory "
                  "(config.json + safetensors + tokenizer) into a scalelm model directory.")
    p.add_argument("format", choices=["hf"], help="the format to read (hf)")
    p.add_argument("path", help="Hugging Face model directory")
    p.add_argument("--out", required=True, help="new directory to write")
    args = p.parse_args(argv)
    from scalelm.interop.hf_import import import_hf

    out, has_tokenizer = import_hf(args.path, args.out)
    note = "" if has_tokenizer else " (no tokenizer in the source: generate needs one)"
    print(f"wrote {out}{note}; use it like a run: `scalelm generate {out}`, `scalelm train --init-from {out}`")
    return 0


def main_merge(argv: list[str]) -> int:
    p = CliParser(prog="scalelm merge", description="Fold a LoRA run's adapters into its base weights and write "
                  "a plain model directory.")
    p.add_argument("path", help="LoRA run directory or one of its checkpoints")
    p.add_argument("--out", required=True, help="new directory to write")
    args = p.parse_args(argv)
    from scalelm.interop.merge import merge_run

    out = merge_run(args.path, args.out)
    print(f"wrote {out}: the base with the adapters merged; use it like a run (`scalelm generate {out}`)")
    return 0


def main_finetune_classify(argv: list[str]) -> int:
    if wants_help(argv):
        print("usage: scalelm finetune-classify --init-from RUN_OR_HF_DIR --data LABELLED.jsonl --out RUN "
              "[--val-fraction F] [--SECTION.KEY VALUE ...]\n\n"
              "Trains a classification head on the last token's hidden state, end to end, on JSONL lines with\n"
              "`text` and `label` fields; accuracy on a held-out split (--val-fraction, default 0.2) is reported.\n"
              "Other options are `scalelm train` keys (--train.steps, --optim.lr, --train.global_batch, ...).")
        return 0
    from scalelm.interop.classify import finetune_classify

    own, rest = _take(argv, ("--data", "--val-fraction"))
    if "--data" not in own:
        raise UsageError("finetune-classify needs --data LABELLED.jsonl (lines with `text` and `label`)")
    try:
        fraction = float(own.get("--val-fraction", 0.2))
    except ValueError:
        raise UsageError(f"--val-fraction {own['--val-fraction']!r} is not a number; e.g. 0.2") from None
    result = finetune_classify(own["--data"], rest, fraction)
    print(f"done: step {result['step']}, val loss {result['val_loss']:.4f}, accuracy {result['accuracy']:.3f} on "
          f"{result['val_examples']} held-out examples; run directory {result['out']}")
    return 0


def _take(argv: list[str], flags: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """({flag: value} for `flags` given as `--flag VALUE` or `--flag=VALUE`, the other arguments in order)."""
    own: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in flags:
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            own[name] = value
        else:
            rest.append(argv[i])
        i += 1
    return own, rest


def main_classify(argv: list[str]) -> int:
    p = CliParser(prog="scalelm classify", description="Predict the label of texts with a run written by "
                  "`scalelm finetune-classify`.")
    p.add_argument("path", help="classifier run directory or checkpoint")
    p.add_argument("--text", action="append", required=True, help="text to classify (repeat for several)")
    args = p.parse_args(argv)
    from scalelm.interop.classify import load_classifier, predict

    model, tokenizer, labels = load_classifier(args.path)
    for text in args.text:
        label, prob = predict(model, tokenizer, labels, text)
        print(f"{label}\t{prob:.3f}")
    return 0
