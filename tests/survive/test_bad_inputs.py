"""The bad-input catalog: what a person can get wrong with `train`, `prepare`, `generate`, `plan` and `calibrate`
— files, keys, types, layouts, data, checkpoints, devices — ends in one line `error: ...` that names the problem,
exit code 2, no traceback, and nothing saved is changed. (Flag spelling and argparse mistakes of every command are
in tests/cli/test_usage.py; damaged checkpoints and a full disk in test_checkpoints.py.)"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import TINY, train

from scalelm.cli import main

RUN_ARGS = ("--train.steps", "4", "--checkpoint.every", "2", "--train.eval_batches", "1", "--cpu.matmul", "blas")
DS = ["--model.preset", "tiny", "--data.path", "ds", "--train.seq_len", "16", "--train.global_batch", "4"]


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / name).write_text(text)


def _meta(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        meta = json.loads((root / "ds" / "meta.json").read_text())
        change(meta)
        (root / "ds" / "meta.json").write_text(json.dumps(meta))
    return setup


def _truncate(root: Path) -> None:
    shard = root / "ds" / "train.bin"
    shard.write_bytes(shard.read_bytes()[:-10])


def _flip(path: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        data = bytearray((root / path).read_bytes())
        data[len(data) // 2] ^= 0x01
        (root / path).write_bytes(bytes(data))
    return setup


def _flip_all(root: Path) -> None:
    for ckpt in sorted((root / "run" / "checkpoints").iterdir()):
        _flip(f"run/checkpoints/{ckpt.name}/model.safetensors")(root)


def _prepared(name: str, text: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        (root / f"{name}.txt").write_text(text)
        assert main(["prepare", f"{name}.txt", "--out", name]) == 0
    return setup


def _split_shard(meta: dict) -> None:
    meta["splits"]["train"]["file"] = "../train.bin"


def _big_vocab(meta: dict) -> None:
    meta["vocab_size"] = 70000


STEP4 = "run/checkpoints/step_00000004"
CASES: list[tuple[str, list[str], str, Callable[[Path], None] | None]] = [
    # ---- train: config files, keys, types and values ----
    ("malformed TOML", ["train", "--config", "bad.toml"], "config file 'bad.toml' is not valid TOML: Expected ']'",
     _write("bad.toml", "[train\nsteps = 3\n")),
    ("missing config file", ["train", "--config", "nope.toml"], "config file 'nope.toml' not found", None),
    ("mistyped key in TOML", ["train", "--config", "typo.toml"],
     "unknown config key 'train.stepz'; did you mean 'train.steps'?", _write("typo.toml", "[train]\nstepz = 3\n")),
    ("mistyped section in TOML", ["train", "--config", "sect.toml"],
     "unknown config key 'trian.steps'; did you mean 'train.steps'?", _write("sect.toml", "[trian]\nsteps = 3\n")),
    ("wrong type in TOML", ["train", "--config", "type.toml"], "train.steps='ten' is not an integer",
     _write("type.toml", '[train]\nsteps = "ten"\n')),
    ("list for an integer", ["train", "--config", "list.toml"], "seed=[1, 2] is not an integer",
     _write("list.toml", "seed = [1, 2]\n")),
    ("mistyped flag", ["train", "--optim.lrr", "1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?", None),
    ("mistyped preset key", ["train", "--model.presett", "tiny"], "did you mean 'model.preset'?", None),
    ("unknown preset", ["train", "--model.preset", "tinyy"], "model.preset:", None),
    ("choice typo", ["train", "--optim.schedule", "cosin"], "is not one of: cosine, linear, wsd, constant (did you "
     "mean 'cosine'?)", None),
    ("unknown dtype", ["train", "--train.dtype", "fp8"], "train.dtype='fp8' is not one of: auto, fp32, bf16, fp16",
     None),
    ("not a boolean", ["train", "--metrics.progress", "perhaps"], "metrics.progress='perhaps' is not a boolean", None),
    ("negative steps", ["train", "--train.steps", "-5"], "train.steps=-5 must be > 0", None),
    ("zero learning rate", ["train", "--optim.lr", "0"], "optim.lr=0.0 must be > 0", None),
    ("keep no checkpoint", ["train", "--checkpoint.keep", "0"], "checkpoint.keep=0 must be >= 1", None),
    ("zero timeout", ["train", "--parallel.timeout_s", "0"], "parallel.timeout_s=0.0 must be a positive number", None),
    ("negative guard", ["train", "--train.max_nonfinite_steps", "-1"], "train.max_nonfinite_steps=-1 must be >= 0",
     None),
    ("sequence longer than the model", ["train", "--model.preset", "tiny", "--train.seq_len", "4096"],
     "train.seq_len=4096 exceeds model.max_seq_len=64", None),
    ("micro-batch not dividing", ["train", "--train.micro_batch", "3", "--train.global_batch", "8"],
     "train.micro_batch=3 does not divide train.global_batch=8", None),
    ("heads not dividing the width", ["train", "--model.preset", "tiny", "--model.d_model", "30"],
     "model.n_head=4 does not divide model.d_model=30", None),
    # ---- train: layouts that cannot run on this world size or this model (refused before any process starts) --
    ("no processes", ["train", "--nproc", "0"], "--nproc needs a positive number of processes, got '0'", None),
    ("negative restarts", ["train", "--max-restarts", "-1"],
     "--max-restarts needs a number of restarts (0 or more), got '-1'", None),
    ("tp above the kv heads", ["train", "--model.preset", "tiny", "--nproc", "2", "--parallel.tp", "4"],
     "parallel.tp=4 does not divide model.n_kv_head=2", None),
    ("pp above the world", ["train", "--model.preset", "tiny", "--nproc", "2", "--parallel.pp", "4"],
     "2 processes are not divisible by dp_replicate × tp × pp = 4", None),
    ("batch not dividing dp", ["train", "--model.preset", "tiny", "--nproc", "2", "--train.global_batch", "3"],
     "train.global_batch=3 is not divisible by the 2 data-parallel ranks", None),
    ("unknown ZeRO stage", ["train", "--nproc", "2", "--parallel.zero", "5"], "parallel.zero=5 is not one of 0, 1, 2, 3",
     None),
    ("no CUDA device", ["train", "--model.preset", "tiny", "--device", "cuda"],
     "device=cuda but no CUDA device is visible; use --device cpu", None),
    ("fp16 on CPU", ["train", "--model.preset", "tiny", "--device", "cpu", "--train.dtype", "fp16"],
     "train.dtype=fp16 needs a CUDA device", None),
    # ---- train: data ----
    ("missing dataset", ["train", "--model.preset", "tiny", "--data.path", "nowhere"],
     "nowhere is not a prepared dataset (no meta.json)", None),
    ("vocabulary larger than the model's", ["train", "--model.preset", "tiny", "--model.vocab_size", "16"],
     "the dataset's tokenizer has 84 tokens but model.vocab_size=16; set --model.vocab_size 128", None),
    ("truncated shard", ["train", *DS], "ds/train.bin has", _truncate),
    ("changed shard, verified", ["train", *DS, "--data.verify", "true"],
     "ds/train.bin does not match its sha256 in meta.json", _flip("ds/train.bin")),
    ("meta.json not JSON", ["train", *DS], "ds/meta.json is not valid JSON", _write("ds/meta.json", "{splits")),
    ("shard outside the dataset", ["train", *DS], "names the shard '../train.bin' outside the dataset directory",
     _meta(_split_shard)),
    ("vocabulary too large for the token dtype", ["train", *DS],
     "a vocabulary of 70000 tokens does not fit the shard dtype uint16", _meta(_big_vocab)),
    ("split shorter than a window", ["train", "--model.preset", "tiny", "--data.path", "short", "--train.seq_len",
                                     "64"], "the validation split has 39 tokens, not more than seq_len + 1 = 65",
     _prepared("short", "a few words, " * 30)),
    # ---- train: resuming a run ----
    ("checkpoint of another model shape", ["train", *TINY, "--out", "run", *RUN_ARGS, "--model.d_model", "64"],
     "was saved from another model (d_model 32 there, 64 here)", None),
    ("checkpoint of another batch", ["train", *TINY, "--out", "run", *RUN_ARGS, "--train.global_batch", "4"],
     "the checkpoint's loader has global_batch=8, this run has 4", None),
    ("checkpoint of another optimizer", ["train", *TINY, "--out", "run", *RUN_ARGS, "--optim.name", "muon"],
     "has 1 optimizer(s), this run has 2; use the same optim.name", None),
    ("every checkpoint damaged", ["train", *TINY, "--out", "run", *RUN_ARGS],
     "every checkpoint in run/checkpoints is damaged", _flip_all),
    # ---- prepare ----
    ("missing source", ["prepare", "nope.txt", "--out", "d"], "source nope.txt does not exist", None),
    ("empty source", ["prepare", "empty.txt", "--out", "d"], "sources empty.txt contain no text", None),
    ("binary source", ["prepare", "blob.bin", "--out", "d"], "blob.bin looks like a binary file",
     lambda root: (root / "blob.bin").write_bytes(bytes(range(256)) * 8)),
    ("JSONL without text", ["prepare", "x.jsonl", "--out", "d"], 'x.jsonl:1 has no string "text" field',
     _write("x.jsonl", '{"txt": "a"}\n')),
    ("JSONL not JSON", ["prepare", "y.jsonl", "--out", "d"], "y.jsonl:2 is not valid JSON",
     _write("y.jsonl", '{"text": "a"}\n{text\n')),
    ("directory without text", ["prepare", "emptydir", "--out", "d"], "directory emptydir has no .txt/.md/.jsonl files",
     lambda root: (root / "emptydir").mkdir()),
    ("validation fraction of 1.5", ["prepare", "small.txt", "--out", "d", "--val-fraction", "1.5"],
     "val_fraction=1.5 must be strictly between 0 and 1", None),
    ("BPE vocabulary below 257", ["prepare", "small.txt", "--out", "d", "--tokenizer", "bpe", "--vocab-size", "10"],
     "vocab_size=10 is too small for byte-level BPE", None),
    ("output over other files", ["prepare", "small.txt", "--out", "notds"], "output directory notds is not empty",
     None),
    # ---- generate ----
    ("no checkpoint in the directory", ["generate", "ds"], "no checkpoint found in 'ds'", None),
    ("damaged checkpoint named", ["generate", STEP4], "model.safetensors does not match its sha256",
     _flip(f"{STEP4}/model.safetensors")),
    ("every checkpoint damaged", ["generate", "run"], "every checkpoint in 'run' is damaged", _flip_all),
    ("no CUDA device for generation", ["generate", "run", "--device", "cuda"], "no CUDA device is visible", None),
    ("not a device", ["generate", "run", "--device", "gpu"], "device 'gpu' is not a device name", None),
    ("missing prompt file", ["generate", "run", "--prompt-file", "nope.txt"], "--prompt-file nope.txt: cannot read",
     None),
    ("negative top-k", ["generate", "run", "--top-k", "-1"], "top_k=-1 must be >= 0", None),
    # ---- plan ----
    ("predicted out of memory", ["plan", "--model", "gpt3-6.7b", "--gpus", "1"],
     "no layout of gpt3-6.7b fits 1 x a100-80gb (80 GiB)", None),
    ("zero devices of a kind", ["plan", "--gpu", "h100-sxm-80gb:0"], "the count after ':' must be a positive integer",
     None),
    ("unknown device", ["plan", "--gpu", "nosuchgpu"], "unknown hardware 'nosuchgpu'", None),
    ("missing hardware file", ["plan", "--hardware", "nosuch.toml"], "hardware file nosuch.toml does not exist", None),
    ("malformed hardware file", ["plan", "--hardware", "bad.toml"], "bad.toml is not valid TOML",
     _write("bad.toml", "[gpu\nname=")),
    ("unknown fabric", ["plan", "--inter-node", "nosuch"], "unknown inter-node fabric 'nosuch'", None),
    ("mixed cluster without counts", ["plan", "--gpu", "a100-80gb:8", "--gpu", "h100-sxm-80gb"],
     "several --gpu values make a heterogeneous cluster", None),
    # ---- calibrate (refused before anything is measured) ----
    ("no devices", ["plan", "--gpus", "0"], "argument --gpus: needs a number ≥ 1, got '0'", None),
    ("no sequences", ["plan", "--global-batch", "0"], "argument --global-batch: needs a number ≥ 1, got '0'", None),
    ("negative tokens", ["plan", "--tokens", "-5"], "argument --tokens: needs a number ≥ 1, got '-5'", None),
    ("stray argument", ["calibrate", "stray"], "unrecognized arguments: stray", None),
    ("output is a directory", ["calibrate", "--out", "."], "cannot write the hardware file", None),
    ("value for a switch", ["calibrate", "--no-collectives=1"], "ignored explicit argument '1'", None),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Files every case may use: a small text, an empty one, a prepared dataset `ds`, a non-dataset directory
    and a trained tiny run `run` (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("world")
    (root / "small.txt").write_text("to be or not to be, that is the question. " * 60)
    (root / "empty.txt").write_text("")
    (root / "notds").mkdir()
    (root / "notds" / "x").write_text("mine")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
        mp.chdir(root)
        assert main(["prepare", "small.txt", "--out", "ds"]) == 0
        assert train(root / "run", *RUN_ARGS) == 0
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("what, argv, message, setup", CASES, ids=[f"{c[1][0]}: {c[0]}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_lost(what, argv, message, setup, world, tmp_path, monkeypatch,
                                                      capsys):
    root = tmp_path / "w"
    shutil.copytree(world, root)
    monkeypatch.chdir(root)
    if setup is not None:
        setup(root)
    before = _snapshot(root)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert message in lines[-1], lines[-1]
    assert "\n" not in lines[-1].strip()
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing saved was changed or removed


def test_the_catalog_covers_every_command():
    commands = {argv[0] for _, argv, _, _ in CASES}
    assert commands == {"train", "prepare", "generate", "plan", "calibrate"} and len(CASES) >= 40
