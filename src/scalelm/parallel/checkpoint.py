"""Distributed checkpoints with DCP (torch.distributed.checkpoint): each rank writes its own shards, any layout
reads them back — resharding happens on load, keyed by the single-process parameter names.

What is saved: `model.<name>` for every parameter and `optim.<name>.<state>` for every optimizer state tensor
(DTensors keep their sharding, plain tensors are written once). Optimizer hyper-parameters are not saved: they
come from the config, and the learning rate from the schedule at the restored step. Only tensors go through DCP.

No unpickling on load. DCP's own metadata file (`.metadata`) is a pickle that its FileSystemReader reads with
`pickle.load`, and non-tensor entries are read with `torch.load(weights_only=False)`. So we write the same
metadata a second time as JSON (`.metadata.json`) and read only that; tensors are read by DCP with
`torch.load(weights_only=True)`; a checkpoint holding any non-tensor entry, or naming a storage file outside its
own directory, is refused. Every rank fsyncs its files before the save returns. The pickle is still
written, so other DCP tools (e.g. `torch.distributed.checkpoint.format_utils`) can open our checkpoints.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType

from scalelm.parallel.data_parallel import local_optimizer

JSON_METADATA = ".metadata.json"
_WRAPPER_SEGMENTS = {"module", "_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"}


class UnsafeCheckpointError(ValueError):
    """A checkpoint that would make loading unpickle objects or read outside its directory."""


def _storage_file(name: object) -> str:
    """A storage file named by the metadata: a plain name inside the checkpoint directory, nothing else."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise UnsafeCheckpointError(f"checkpoint metadata names the storage file {name!r}, which is not a plain file "
                                    f"name inside the checkpoint directory; refusing")
    return name


# ---- names -----------------------------------------------------------------------------------------
def canonical_name(name: str, tied: bool) -> str:
    """The single-process parameter name: wrapper prefixes (DDP, activation checkpointing, compile) removed,
    and a pipeline stage's copy of a tied head named after the embedding it copies."""
    name = ".".join(seg for seg in name.split(".") if seg not in _WRAPPER_SEGMENTS)
    if tied and name == "output.weight":
        return "tok_embeddings.weight"
    return name


def named_parameters(parts: list[nn.Module], tied: bool) -> list[tuple[str, nn.Parameter]]:
    """(canonical name, parameter) over this rank's model parts; a tensor shared inside a part appears once,
    a tied copy on another part appears again under the same name."""
    out = []
    for part in parts:
        for name, p in part.named_parameters():
            out.append((canonical_name(name, tied), p))
    return out


# ---- the state dict DCP sees ------------------------------------------------------------------------
def checkpoint_state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], tied: bool
                     ) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """{key: tensor} to save into or load into (the live tensors themselves), and (alias, source) pairs for
    tensors that appear twice on this rank (ZBV: both tied copies) — copy source → alias after a load."""
    names = {id(p): n for n, p in named_parameters(parts, tied)}
    state: dict[str, torch.Tensor] = {}
    aliases: list[tuple[torch.Tensor, torch.Tensor]] = []

    def put(key: str, tensor: torch.Tensor) -> None:
        if key in state:
            if state[key] is not tensor:
                aliases.append((tensor, state[key]))
        else:
            state[key] = tensor

    for n, p in named_parameters(parts, tied):
        put(f"model.{n}", p)
    for opt in optimizers:
        local = local_optimizer(opt)
        for group in local.param_groups:
            for p in group["params"]:
                for k, v in local.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        put(f"optim.{names[id(p)]}.{k}", v)
    return state, aliases


def init_optimizer_states(optimizers: list[torch.optim.Optimizer]) -> None:
    """Create optimizer states (zeros) so a checkpoint can be loaded into them in place."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    for opt in optimizers:
        _init_optim_state(local_optimizer(opt))


def save(path: Path, parts, optimizers, tied: bool) -> None:
    state, _ = checkpoint_state(parts, optimizers, tied)
    dcp.save({k: v.detach() for k, v in state.items()}, storage_writer=JsonMetadataWriter(path))


@torch.no_grad()
def load(path: Path, parts, optimizers, tied: bool) -> None:
    init_optimizer_states(optimizers)
    state, aliases = checkpoint_state(parts, optimizers, tied)
    missing = sorted(set(state) - set(read_metadata(path).state_dict_metadata))
    if missing:
        raise KeyError(f"checkpoint {path} lacks {missing[:3]}")
    _dcp_load({k: v.detach() for k, v in state.items()}, path)
    for alias, source in aliases:
        alias.copy_(source)


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Weights of a DCP checkpoint into a plain single-process model (no process group needed)."""
    tied = model.cfg.tie_embeddings
    state = {f"model.{canonical_name(n, tied)}": p.detach() for n, p in model.named_parameters()}
    _dcp_load(state, path)


def _dcp_load(state: dict[str, torch.Tensor], path: Path) -> None:
    """dcp.load in place; without a process group (one process) DCP runs its single-process path."""
    read_metadata(path)  # refuses unsafe metadata here: inside dcp.load the error would come back wrapped
    distributed = dist.is_available() and dist.is_initialized()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=SafeReader(path), no_dist=not distributed)


# ---- JSON metadata ----------------------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise UnsafeCheckpointError(f"unknown dtype {name!r} in checkpoint metadata")
    return value


def metadata_to_json(md: Metadata) -> dict:
    entries = {}
    for fqn, item in md.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            entries[fqn] = {"dtype": str(item.properties.dtype), "size": list(item.size),
                            "chunks": [[list(c.offsets), list(c.sizes)] for c in item.chunks]}
        else:
            entries[fqn] = {"bytes": True}
    storage = [{"fqn": idx.fqn, "offset": None if idx.offset is None else list(idx.offset), "index": idx.index,
                "path": info.relative_path, "start": info.offset, "length": info.length,
                "transforms": list(info.transform_descriptors) if info.transform_descriptors else None}
               for idx, info in md.storage_data.items()]
    planner = {k: list(v) for k, v in (md.planner_data or {}).items()}
    return {"version": md.version, "entries": entries, "storage": storage, "planner": planner}


def metadata_from_json(data: dict) -> Metadata:
    entries = {}
    for fqn, e in data["entries"].items():
        if e.get("bytes"):
            entries[fqn] = BytesStorageMetadata()
        else:
            entries[fqn] = TensorStorageMetadata(
                TensorProperties(dtype=_dtype(e["dtype"])), torch.Size(e["size"]),
                [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in e["chunks"]])
    storage = {MetadataIndex(s["fqn"], s["offset"], s["index"]):
               _StorageInfo(_storage_file(s["path"]), s["start"], s["length"], s["transforms"])
               for s in data["storage"]}
    planner = {k: tuple(v) for k, v in data["planner"].items()}
    return Metadata(state_dict_metadata=entries, planner_data=planner, storage_data=storage,
                    storage_meta=StorageMeta(), version=data["version"])


def read_metadata(path: Path) -> Metadata:
    return metadata_from_json(json.loads((Path(path) / JSON_METADATA).read_text()))


def is_dcp_checkpoint(path: Path) -> bool:
    return (Path(path) / JSON_METADATA).is_file()


class JsonMetadataWriter(FileSystemWriter):
    """FileSystemWriter that also writes the metadata as JSON (rank 0, after the pickle)."""

    def __init__(self, path: Path):
        super().__init__(str(path), single_file_per_rank=True, sync_files=True)
        self._root = Path(path)

    def finish(self, metadata: Metadata, results) -> None:
        super().finish(metadata, results)
        tmp = self._root / (JSON_METADATA + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(metadata_to_json(metadata)))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self._root / JSON_METADATA)


class SafeReader(FileSystemReader):
    """FileSystemReader that reads the JSON metadata (never the pickle) and refuses non-tensor entries."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self._root = Path(path)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        md = read_metadata(self._root)
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan, planner):
        if any(item.type == LoadItemType.BYTE_IO for item in plan.items):
            raise UnsafeCheckpointError("checkpoint holds non-tensor entries, which would be unpickled; refusing")
        return super().read_data(plan, planner)


__all__ = ["UnsafeCheckpointError", "canonical_name", "checkpoint_state", "is_dcp_checkpoint", "load", "load_model_weights",
           "save"]
