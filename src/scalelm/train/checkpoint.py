"""Checkpoints of a run: weights in safetensors, the rest in JSON and weights-only tensor files.

Layout: RUN/checkpoints/step_00000100/{model.safetensors, model.json, optimizer.pt, rng.pt, state.json}.
A distributed run writes the weights and optimizer states with DCP instead (`scalelm.parallel.checkpoint`:
shards per rank, `.metadata.json`, `rng_rank<r>.pt`), which any layout — one process included — can load.
Nothing here unpickles arbitrary objects: safetensors and JSON cannot, tensor files are read with
`torch.load(weights_only=True)`, and DCP metadata is read from JSON. A checkpoint is written into a temporary
directory, fsynced, sealed with a manifest of sizes and hashes and renamed into place (`scalelm.train.durable`), so
an interrupted save never damages the previous one, and a damaged checkpoint is skipped for the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scalelm.model.config import ModelConfig
from scalelm.train import durable
from scalelm.train.durable import CheckpointError

CHECKPOINT_DIR = "checkpoints"


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with tied tensors kept once (the first name wins), detached, contiguous, on CPU."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of a full (gathered) model state in canonical order: sorted names, then name, dtype, shape, bytes.
    The same weights give the same hash on any layout."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Completed checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "state.json").is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def latest_good_checkpoint(run_dir: str | Path, hashes: bool = True,
                           warn: Callable[[str], None] = print_warning) -> Path | None:
    """The newest checkpoint that matches its manifest; each damaged newer one is skipped with a one-line warning."""
    found = checkpoint_dirs(run_dir)
    for i, path in enumerate(reversed(found)):
        problem = durable.check(path, hashes)
        if problem is None:
            return path
        older = found[-2 - i] if i + 1 < len(found) else None
        warn(f"checkpoint {path} is damaged ({problem}); "
             + (f"trying the previous one, {older.name}" if older else "no older checkpoint is left"))
    return None


def remove_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporaries of saves that were killed (called once when a run starts, by the writing rank)."""
    return durable.remove_temporaries(Path(run_dir) / CHECKPOINT_DIR)


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                    state: dict[str, Any], keep: int) -> Path:
    """Write step `step` atomically and prune all but the newest `keep`."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        save_file(unique_state(model), str(tmp / "model.safetensors"))
        cfg: ModelConfig = model.cfg  # type: ignore[assignment]
        (tmp / "model.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        torch.save([opt.state_dict() for opt in optimizers], tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=1))
        durable.write_manifest(tmp)
    except OSError as e:  # a full disk, a quota, a vanished mount: keep what was saved before
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failed(run_dir, step, e) from None
    _publish(tmp, final, run_dir, keep)
    return final


def _save_failed(run_dir: str | Path, step: int, e: OSError | None) -> CheckpointError:
    """The one line for a failed save; e is None on the ranks that saw another rank fail."""
    previous = latest_checkpoint(run_dir)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    why = (e.strerror or str(e)) if e is not None else "another rank failed to write its part"
    return CheckpointError(f"could not write the checkpoint of step {step} in {Path(run_dir) / CHECKPOINT_DIR} "
                           f"({why}); {kept}; free space and run the same command to resume")


def _rng_state() -> dict[str, Any]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _publish(tmp: Path, final: Path, run_dir: str | Path, keep: int) -> None:
    """Rename a finished checkpoint into place (replacing one of the same step) and prune all but `keep`."""
    durable.publish(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        durable.discard(old)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def save_distributed_checkpoint(run_dir: str | Path, step: int, parts: list[nn.Module],
                                optimizers: list[torch.optim.Optimizer], state: dict[str, Any], keep: int,
                                model_cfg: ModelConfig) -> Path:
    """Every rank writes its shards into a temporary directory with DCP; rank 0 adds the JSON files and
    renames it into place once all ranks are done. After each phase the ranks agree whether any of them failed
    (a full disk, a quota), so all of them stop with the same one-line error instead of waiting for the one that
    failed; the temporary directory goes and the previous checkpoint stays."""
    from torch.distributed.checkpoint.api import CheckpointException

    from scalelm.parallel import checkpoint as dcp_ckpt

    rank, world = _rank_world()
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"

    def phase(write: Callable[[], None]) -> None:
        error: BaseException | None = None
        try:
            write()
        except (OSError, CheckpointException) as e:  # DCP reports a rank's failed write as CheckpointException
            error = e
        failed = torch.tensor([float(error is not None)])
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if failed.item():
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(error, CheckpointException):  # the rank's own OSError, if it was the one that failed
                error = getattr(error, "failures", {}).get(rank)
            raise _save_failed(run_dir, step, error if isinstance(error, OSError) else None) from None

    def start() -> None:
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

    def shards() -> None:
        dcp_ckpt.save(tmp, parts, optimizers, model_cfg.tie_embeddings)
        # Per-rank RNG (dropout masks): restored only on the same layout, where it means the same thing.
        torch.save(_rng_state(), tmp / f"rng_rank{rank}_of{world}.pt")

    def seal() -> None:
        if rank == 0:
            (tmp / "model.json").write_text(json.dumps(model_cfg.to_dict(), indent=1))
            (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=1))
            durable.write_manifest(tmp)  # every rank's shards are complete and fsynced (DCP sync_files)
            _publish(tmp, final, run_dir, keep)

    phase(start)
    phase(shards)
    phase(seal)
    return final


def load_distributed_checkpoint(path: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                                model_cfg: ModelConfig) -> dict[str, Any]:
    """Load a DCP checkpoint written on any layout into this rank's (parallelized) parts and optimizers."""
    from scalelm.parallel import checkpoint as dcp_ckpt

    if not dcp_ckpt.is_dcp_checkpoint(path):
        raise CheckpointError(f"checkpoint {path} was written by a single process (safetensors); resume it with one "
                              f"process, or start the distributed run in a fresh --out directory")
    check_same_model(path, model_cfg)
    try:
        dcp_ckpt.load(path, parts, optimizers, model_cfg.tie_embeddings)
        state = json.loads((path / "state.json").read_text())
    except dcp_ckpt.UnsafeCheckpointError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this run ({_short(e)}); was it saved from a different "
                              f"model or optimizer config?") from None
    rank, world = _rank_world()
    rng_file = path / f"rng_rank{rank}_of{world}.pt"
    if rng_file.is_file():
        try:
            torch.set_rng_state(torch.load(rng_file, weights_only=True)["cpu"])
        except pickle.UnpicklingError:
            raise CheckpointError(f"checkpoint {path}: {rng_file.name} holds pickled code or objects, which are never "
                                  f"loaded; refusing it") from None
    return state


def load_checkpoint(path: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore weights, optimizer states and RNG; returns the trainer state (step, loader, ...).
    A checkpoint written by a distributed run (DCP) is loaded on one process too: the layout may change."""
    from scalelm.parallel import checkpoint as dcp_ckpt

    if dcp_ckpt.is_dcp_checkpoint(path):
        return load_distributed_checkpoint(path, [model], optimizers, model.cfg)
    check_same_model(path, model.cfg)
    try:
        load_weights(model, path / "model.safetensors")
        opt_states = torch.load(path / "optimizer.pt", weights_only=True)
        rng = torch.load(path / "rng.pt", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except pickle.UnpicklingError as e:  # weights_only=True met something other than tensors and containers
        raise CheckpointError(f"checkpoint {path} holds pickled code or objects, which are never loaded; refusing "
                              f"it ({' '.join(str(e).split())[:120]})") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({_short(e)}); delete it to resume from an older "
                              f"one") from None
    if len(opt_states) != len(optimizers):
        raise CheckpointError(f"checkpoint {path} has {len(opt_states)} optimizer(s), this run has {len(optimizers)}; "
                              f"use the same optim.name to resume")
    for opt, sd in zip(optimizers, opt_states):
        opt.load_state_dict(sd)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def _short(e: BaseException) -> str:
    """An exception's message on one line, at most 200 characters (torch's can span dozens of lines)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."


def check_same_model(path: Path, cfg: ModelConfig) -> None:
    """Refuse, naming the differences, a checkpoint saved from a model of another shape than this run's."""
    try:
        saved = json.loads((path / "model.json").read_text())
    except (OSError, ValueError):
        return  # no readable model.json: the weights' own check speaks
    mine = cfg.to_dict()
    diff = [f"{k} {saved[k]} there, {mine[k]} here" for k in sorted(mine) if k in saved and saved[k] != mine[k]]
    if diff:
        raise CheckpointError(f"checkpoint {path} was saved from another model ({'; '.join(diff[:4])}); resume with "
                              f"the same model settings, or start in a fresh --out directory")


def load_weights(model: nn.Module, file: Path) -> None:
    """Load a safetensors state into `model`, re-tying shared tensors that were saved once."""
    tensors = load_file(str(file))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {n for n in missing if n == "output.weight" and getattr(model, "cfg", None) and model.cfg.tie_embeddings}
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{file}: weights do not match the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); was it saved from a different model config?")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (→ its newest checkpoint) or a checkpoint directory."""
    p = Path(path)
    if (p / "model.json").is_file() and ((p / "model.safetensors").is_file() or (p / ".metadata.json").is_file()):
        durable.verify(p)
        return p
    damaged: list[str] = []
    latest = latest_good_checkpoint(p, warn=damaged.append)
    if latest is None and damaged:
        raise CheckpointError(f"every checkpoint in {str(p)!r} is damaged (the newest: {damaged[0].split('; ')[0]})")
    for line in damaged:
        print_warning(line)
    if latest is None:
        raise CheckpointError(f"no checkpoint found in {str(p)!r}; pass a run directory written by `scalelm train` "
                              f"or one of its checkpoints/step_* directories")
    return latest


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise CheckpointError(f"device {device!r} is not a device name; use cpu or cuda (cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} is not available: no CUDA device is visible; use --device cpu")


def load_model(path: str | Path, device: str = "cpu") -> nn.Module:
    """The one loading path: model of a run directory or checkpoint, eval mode, on `device`."""
    from scalelm.model.gpt import GPT

    _check_device(device)
    ckpt = resolve_checkpoint(path)
    cfg = ModelConfig.from_dict(json.loads((ckpt / "model.json").read_text()))
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_buffers(device)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    from scalelm.parallel import checkpoint as dcp_ckpt

    if dcp_ckpt.is_dcp_checkpoint(ckpt):
        try:
            dcp_ckpt.load_model_weights(ckpt, model)
        except dcp_ckpt.UnsafeCheckpointError as e:
            raise CheckpointError(f"checkpoint {ckpt}: {e}") from None
    else:
        load_weights(model, ckpt / "model.safetensors")
    return model.eval()
