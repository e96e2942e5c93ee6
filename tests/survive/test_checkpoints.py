"""Durable checkpoints: sealed by a manifest and checked before loading; a damaged one is skipped for the previous
good one with one warning; what killed saves left is removed at restart; keep-last-K; a full disk loses nothing;
loading never runs pickled code nor reads a file outside the checkpoint directory. In-process, tiny runs."""

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import metrics, train

import scalelm
from scalelm.cli import main
from scalelm.train import durable
from scalelm.train.checkpoint import CheckpointError, checkpoint_dirs, latest_good_checkpoint

ARGS = ("--train.log_every", "1", "--checkpoint.every", "2", "--checkpoint.keep", "3", "--train.eval_batches", "1",
        "--cpu.matmul", "blas")
STEPS4 = ("--train.steps", "4", *ARGS)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (copied by each test that changes it)."""
    root = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
        assert train(root / "run", *STEPS4) == 0
    return root / "run"


def copy(base: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    return run


def end_hash(run: Path) -> str:
    return [r for r in metrics(run) if r.get("event") == "end"][-1]["params_sha256"]


def error_line(capsys) -> str:
    """The one error line, last on stderr (a run that started logs its progress there before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:] and "Traceback" not in err, err
    return lines[-1]


def reseal(ckpt: Path) -> None:
    """Rewrite the manifest to match the files as they are now (what an attacker who edits files can do)."""
    (ckpt / durable.MANIFEST).unlink()
    durable.write_manifest(ckpt)


def test_every_checkpoint_is_sealed_by_a_manifest(base):
    ckpts = checkpoint_dirs(base)
    assert [c.name for c in ckpts] == ["step_00000002", "step_00000004"]
    assert not [p for p in (base / "checkpoints").iterdir() if p.name.startswith(".")]
    for ckpt in ckpts:
        files = json.loads((ckpt / durable.MANIFEST).read_text())["files"]
        assert sorted(files) == sorted(p.name for p in ckpt.iterdir() if p.name != durable.MANIFEST)
        for name, entry in files.items():
            data = (ckpt / name).read_bytes()
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert durable.check(ckpt) is None


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-100])


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file, problem", [
    (_truncate, "model.safetensors", "model.safetensors has"),
    (_flip, "optimizer.pt", "optimizer.pt does not match its sha256"),
    (Path.unlink, "rng.pt", "rng.pt is missing"),
])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_good_one(base, tmp_path, capsys, damage, file, problem):
    run = copy(base, tmp_path)
    damage(run / "checkpoints" / "step_00000004" / file)
    warnings: list[str] = []
    assert latest_good_checkpoint(run, warn=warnings.append) == run / "checkpoints" / "step_00000002"
    assert len(warnings) == 1 and problem in warnings[0] and "trying the previous one, step_00000002" in warnings[0]
    capsys.readouterr()
    assert train(run, *STEPS4) == 0  # resumes at step 2, never loads the damaged step 4
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [f"warning: {warnings[0]}"]
    assert end_hash(run) == end_hash(base)  # exact resume from the older checkpoint
    assert durable.check(run / "checkpoints" / "step_00000004") is None  # rewritten whole


def test_a_damaged_checkpoint_named_directly_is_refused(base, tmp_path, capsys):
    run = copy(base, tmp_path)
    ckpt = run / "checkpoints" / "step_00000004"
    _flip(ckpt / "model.safetensors")
    assert main(["generate", str(ckpt), "--max-new-tokens", "2"]) == 2
    assert "model.safetensors does not match its sha256" in error_line(capsys)
    with pytest.raises(CheckpointError, match="is damaged"):
        scalelm.load(ckpt)


def test_temporaries_of_killed_saves_are_removed_and_the_newest_k_kept(base, tmp_path):
    run = copy(base, tmp_path)
    root = run / "checkpoints"
    for name in (".tmp_step_00000006_4242", ".tmp_replaced_step_00000004_17", ".tmp_pruned_step_00000002_17"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"half")
    assert train(run, "--train.steps", "8", *ARGS, "--checkpoint.keep", "2") == 0
    assert sorted(p.name for p in root.iterdir()) == ["step_00000006", "step_00000008"]


def test_a_full_disk_keeps_the_previous_checkpoint(base, tmp_path, monkeypatch, capsys):
    run = copy(base, tmp_path)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("scalelm.train.checkpoint.save_file", no_space)
    assert train(run, "--train.steps", "6", *ARGS) == 2
    previous = run / "checkpoints" / "step_00000004"
    assert error_line(capsys) == (
        f"error: could not write the checkpoint of step 6 in {run / 'checkpoints'} (No space left on device); the "
        f"previous checkpoint {previous} is intact; free space and run the same command to resume")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert durable.check(previous) is None
    monkeypatch.undo()
    assert train(run, "--train.steps", "6", *ARGS) == 0  # the same command resumes once there is space


class _Payload:
    """Unpickling this runs a shell command (writes the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_in_optimizer_pt_is_refused_without_running(base, tmp_path, capsys):
    run = copy(base, tmp_path)
    ckpt = run / "checkpoints" / "step_00000004"
    marker = tmp_path / "payload-ran"
    torch.save([_Payload(marker)], ckpt / "optimizer.pt")
    reseal(ckpt)  # the manifest matches: only the loader stands between the payload and the shell
    assert train(run, "--train.steps", "6", *ARGS) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: checkpoint {ckpt} holds pickled code or objects, which are never loaded; refusing")
    assert not marker.exists()


def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused(base, tmp_path, capsys):
    run = copy(base, tmp_path)
    ckpt = run / "checkpoints" / "step_00000004"
    manifest = json.loads((ckpt / durable.MANIFEST).read_text())
    manifest["files"]["../../config.toml"] = {"bytes": 1, "sha256": "0" * 64}
    (ckpt / durable.MANIFEST).write_text(json.dumps(manifest))
    warnings: list[str] = []
    assert latest_good_checkpoint(run, warn=warnings.append) == run / "checkpoints" / "step_00000002"
    assert "names '../../config.toml', outside the checkpoint directory" in warnings[0]
    assert main(["generate", str(ckpt), "--max-new-tokens", "2"]) == 2
    assert "outside the checkpoint directory" in error_line(capsys)


def test_dcp_metadata_naming_a_file_outside_the_checkpoint_is_refused(base, tmp_path, capsys):
    """A distributed checkpoint's storage files come from its .metadata.json: `../` there never reads outside."""
    from scalelm.parallel import checkpoint as dcp_ckpt

    model = scalelm.load(base)
    run = copy(base, tmp_path)
    ckpt = run / "checkpoints" / "step_00000006"  # what a distributed run writes, in a run directory
    dcp_ckpt.save(ckpt, [model], [], model.cfg.tie_embeddings)
    for name in ("model.json", "state.json"):
        shutil.copy(run / "checkpoints" / "step_00000004" / name, ckpt / name)
    assert scalelm.load(ckpt) is not None  # the untouched DCP checkpoint loads
    meta = json.loads((ckpt / dcp_ckpt.JSON_METADATA).read_text())
    meta["storage"][0]["path"] = "../../secret.distcp"
    (ckpt / dcp_ckpt.JSON_METADATA).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="'../../secret.distcp', which is not a plain file name"):
        scalelm.load(ckpt)
    assert main(["generate", str(ckpt), "--max-new-tokens", "2"]) == 2
    assert "not a plain file name inside the checkpoint directory; refusing" in error_line(capsys)


@pytest.mark.parametrize("name, safe", [("model.safetensors", True), ("__0_0.distcp", True), ("../x", False),
                                        ("/etc/passwd", False), ("..", False), ("a/b", False), ("", False)])
def test_safe_names(name, safe):
    assert durable.safe_name(name) is safe
