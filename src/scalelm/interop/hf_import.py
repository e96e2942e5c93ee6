"""`scalelm import hf`: a local Hugging Face GPT-2 or Llama directory → a scalelm model directory
(model.json + model.safetensors + tokenizer/) that `scalelm.load`, `generate`, `eval`, `export hf` and
`train --init-from` read like any checkpoint.

Tensors are renamed and re-laid out only (dtype kept), so exporting the import gives back the same tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from scalelm.interop.hf_export import fresh_dir, publish
from scalelm.interop.hf_tokenizer import load_hf_tokenizer
from scalelm.model.gpt import GPT
from scalelm.train.init_from import is_hf_dir, load_source
from scalelm.usage import UsageError


def check_shapes(cfg, state: dict[str, torch.Tensor]) -> None:
    """Every tensor has its place and shape in the model `cfg` describes (built on the meta device: no memory)."""
    from scalelm.model.hf_layout import FormatError

    with torch.device("meta"):
        own = GPT(cfg).state_dict()
    for name, tensor in state.items():
        if name not in own or own[name].shape != tensor.shape:
            expected = list(own[name].shape) if name in own else "no such tensor"
            raise FormatError(f"{name} is {list(tensor.shape)} in the checkpoint but config.json implies "
                              f"{expected}; is config.json the checkpoint's own?")


def import_hf(hf_dir: str | Path, out: str | Path) -> tuple[Path, bool]:
    """Write the HF model at `hf_dir` as a scalelm model directory `out`; returns (out, has a tokenizer)."""
    if not is_hf_dir(hf_dir):
        raise UsageError(f"{hf_dir} is not a Hugging Face model directory (no config.json with a model_type)")
    cfg, state = load_source(hf_dir)
    check_shapes(cfg, state)
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
    tokenizer = load_hf_tokenizer(hf_dir)
    final, tmp = fresh_dir(out)
    try:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "model.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, final)
    return final, tokenizer is not None
