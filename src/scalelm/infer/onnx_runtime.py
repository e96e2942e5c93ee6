"""Running an exported model (`scalelm export onnx`) in onnxruntime or OpenVINO on the CPU.

`OnnxModel(path, runtime)` answers `model(tokens)` → logits like a scalelm GPT, and with a graph exported
`--with-cache`, `model(tokens, cache=KVCache)` too, so `Generator` decodes with it unchanged (the engine's batching,
sampling, stops and streaming): the cache object gives the left padding and how many positions are past; the
runtime's past keys and values are kept beside it. OpenVINO compiles the same .onnx file (`Core().compile_model`)
with fp32 inference precision, so its logits match PyTorch's as onnxruntime's do.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scalelm.infer.generate import GenerationError
from scalelm.infer.onnx_export import CACHE_KEY, MODEL_KEY, cache_names
from scalelm.model.config import ModelConfig
from scalelm.model.gpt import KVCache

RUNTIMES = ("onnxruntime", "openvino")


def read_metadata(path: str | Path) -> tuple[ModelConfig, bool]:
    """(model config, whether the graph takes a cache) from a file `export_onnx` wrote."""
    import onnx

    if not Path(path).is_file():
        raise GenerationError(f"no ONNX file at {path}; write one with `scalelm export onnx RUN --out {path} "
                              "--with-cache`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and onnx's own errors share no base class
        raise GenerationError(f"{path} is not a readable ONNX file ({e.__class__.__name__})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if MODEL_KEY not in meta:
        raise GenerationError(f"{path} was not written by `scalelm export onnx` (no {MODEL_KEY} metadata)")
    return ModelConfig.from_dict(json.loads(meta[MODEL_KEY])), meta.get(CACHE_KEY) == "1"


class OnnxModel(nn.Module):
    """An exported scalelm model in `runtime` ("onnxruntime" | "openvino"); threads: intra-op threads (None: the
    runtime's default)."""

    def __init__(self, path: str | Path, runtime: str = "onnxruntime", threads: int | None = None):
        super().__init__()
        if runtime not in RUNTIMES:
            raise GenerationError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
        self.cfg, self.with_cache = read_metadata(path)
        self.runtime, self.device = runtime, torch.device("cpu")
        self._past: weakref.WeakKeyDictionary[KVCache, list[np.ndarray]] = weakref.WeakKeyDictionary()
        self._past_names, _ = cache_names(self.cfg.n_layer)
        self._run = _onnxruntime(path, threads) if runtime == "onnxruntime" else _openvino(path, threads)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens [B, T] → logits [B, T, vocab]; with a cache, the tokens continue what it holds."""
        ids = tokens.cpu().numpy().astype(np.int64)
        batch, seq = ids.shape
        if not self.with_cache:
            if cache is not None:
                raise GenerationError("this ONNX file has no cache inputs; export it with `scalelm export onnx "
                                      "RUN --out FILE --with-cache` to generate with it")
            return torch.from_numpy(self._run({"input_ids": ids})[0])
        if cache is None:
            past, mask = self._empty(batch), np.ones((batch, seq), dtype=np.int64)
        else:
            past = self._past.get(cache) or self._empty(batch)
            # 1 from each row's first real slot on: the padding KVCache put before it stays invisible.
            mask = (np.arange(cache.length + seq)[None, :] >= cache.pad.cpu().numpy()[:, None]).astype(np.int64)
        outputs = self._run({"input_ids": ids, "attention_mask": mask, **dict(zip(self._past_names, past))})
        if cache is not None:
            self._past[cache] = outputs[1:]
        return torch.from_numpy(outputs[0])

    def _empty(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.cfg.kv_heads, 0, self.cfg.dim_head)
        return [np.zeros(shape, dtype=np.float32) for _ in self._past_names]


def _onnxruntime(path: str | Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def _openvino(path: str | Path, threads: int | None):
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32"}  # no bf16/f16 downcast on CPUs that have them
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = request.infer(feed)
        return [np.array(result[port]) for port in outputs]

    return run
