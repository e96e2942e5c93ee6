"""ONNX export of a scalelm model: `export_onnx(model, path, with_cache=...)` and `scalelm export onnx`.

The graph comes from the dynamo exporter (`torch.onnx.export(..., dynamo=True)`: torch.export, then onnxscript
translates the ATen graph); the older TorchScript exporter has no rule for `aten::rms_norm` and cannot export the
Llama-style models. Opset 18 (ONNX 1.13; onnxruntime ≥ 1.14 and OpenVINO read it); RMSNorm and SDPA are
decomposed into primitive ops there.

Two graphs, both with dynamic `batch` and `seq` axes:
- plain: input_ids [batch, seq] int64 → logits [batch, seq, vocab] (the whole sequence, causal, no padding);
- with cache (`with_cache=True`, for decoding): input_ids [batch, seq], attention_mask [batch, past + seq] int64
  (1 = a real token, 0 = left padding), past_key_i / past_value_i [batch, kv_heads, past, head_dim] for each layer
  i → logits [batch, seq, vocab] and present_key_i / present_value_i [batch, kv_heads, past + seq, head_dim]
  (past and new keys concatenated). A first call passes past = 0 positions. Positions count each row from its
  first real token, as scalelm's KVCache does, so a left-padded row computes what it would alone.
The model's config travels in the file's metadata (`scalelm.model`, `scalelm.with_cache`), so a runtime knows
the layer count, heads and context without the run directory.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 18
MODEL_KEY, CACHE_KEY = "scalelm.model", "scalelm.with_cache"


class _Plain(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


class _ConcatCache:
    """Stands in for KVCache inside the exported graph: positions and mask come from attention_mask, each layer's
    keys and values are the past ones with the new ones appended (a graph cannot write a buffer in place)."""

    def __init__(self, past: list[torch.Tensor], attention_mask: torch.Tensor, n_new: int, max_seq_len: int):
        total = attention_mask.shape[1]
        # [B, T]; clamped at the context's end as the engine's cache is (a finished row may run past it).
        self.positions = (attention_mask.cumsum(-1) - 1).clamp(min=0, max=max_seq_len - 1)[:, total - n_new:]
        queries = torch.arange(total - n_new, total, device=attention_mask.device)[:, None]
        keys = torch.arange(total, device=attention_mask.device)[None, :]
        visible = (keys <= queries)[None] & attention_mask.bool()[:, None, :]  # causal, no padding
        self.mask = (visible | (keys == queries)[None])[:, None]  # [B, 1, T, total]; a pad slot sees itself
        self.past, self.present = past, []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([self.past[2 * layer], k], dim=2)
        v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.present += [k, v]
        return k, v


class _WithCache(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        cache = _ConcatCache(list(past), attention_mask, input_ids.shape[1], self.model.cfg.max_seq_len)
        return (self.model(input_ids, cache=cache), *cache.present)


def cache_names(n_layer: int) -> tuple[list[str], list[str]]:
    """Names of the past inputs and present outputs, layer by layer: key then value."""
    past = [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    return past, [name.replace("past_", "present_") for name in past]


def export_onnx(model: nn.Module, path: str | Path, with_cache: bool = False) -> Path:
    """Write `model` (a scalelm GPT, fp32, eval mode) to `path` as ONNX; see the module docstring for the graph."""
    cfg = model.cfg
    model = model.eval()
    # DYNAMIC: torch.export finds the relations between the axes itself (the mask's length is past + seq).
    batch = seq = torch.export.Dim.DYNAMIC
    ids = torch.zeros(2, 3, dtype=torch.long)
    if with_cache:
        past = [torch.zeros(2, cfg.kv_heads, 4, cfg.dim_head) for _ in range(2 * cfg.n_layer)]
        mask = torch.ones(2, 7, dtype=torch.long)
        past_names, present_names = cache_names(cfg.n_layer)
        module, args = _WithCache(model), (ids, mask, *past)
        names = ["input_ids", "attention_mask", *past_names]
        shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, tuple({0: batch, 2: seq} for _ in past))
        outputs = ["logits", *present_names]
    else:
        module, args, names, shapes, outputs = _Plain(model), (ids,), ["input_ids"], ({0: batch, 1: seq},), ["logits"]
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=outputs,
                                    dynamic_shapes=shapes, opset_version=OPSET, verbose=False)
    program.model.metadata_props[MODEL_KEY] = json.dumps(cfg.to_dict())
    program.model.metadata_props[CACHE_KEY] = "1" if with_cache else "0"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path


class _quiet_exporter:
    """The exporter logs each stage and optional-dependency notes at WARNING; a CLI wants only its own line."""

    def __enter__(self):
        self.logger = logging.getLogger("torch.onnx")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def main_export_onnx(argv: list[str]) -> int:
    """`scalelm export onnx RUN_OR_CKPT --out model.onnx [--with-cache]`."""
    from scalelm.usage import CliParser, UsageError

    p = CliParser(prog="scalelm export onnx", description="Write a run's model as ONNX (opset "
                  f"{OPSET}, dynamic batch and sequence axes) for onnxruntime, OpenVINO and other ONNX runtimes.")
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--with-cache", action="store_true", help="the decoding graph: past keys/values in, present "
                   "out, an attention mask for left-padded batches (what `scalelm generate --runtime` runs)")
    args = p.parse_args(argv)
    from scalelm.train.checkpoint import load_model

    model = load_model(args.path).float()
    try:
        out = export_onnx(model, args.out, with_cache=args.with_cache)
    except OSError as e:
        raise UsageError(f"cannot write {args.out} ({e.strerror or e}); choose another --out") from None
    print(f"wrote {out} (opset {OPSET}{', with KV cache' if args.with_cache else ''}); run it with "
          f"`scalelm generate {args.path} --runtime onnxruntime|openvino --onnx {out}`"
          if args.with_cache else f"wrote {out} (opset {OPSET}): input_ids [batch, seq] → logits")
    return 0
