"""Single-process checks of the parallel package: validation messages, stage splits, the safe DCP format,
the communication counter, and the launch helpers (torchrun line, sbatch script)."""

import pickle

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from scalelm.cli import main
from scalelm.config import ConfigError, build_config, validate_parallel
from scalelm.launch import torchrun_command
from scalelm.parallel.checkpoint import JsonMetadataWriter, SafeReader, canonical_name, read_metadata
from scalelm.parallel.pipeline import split_layers, stage_ids, stage_owners
from scalelm.train.slurm import slurm_script


def cfg(**flags):
    return build_config({}, {"model.preset": "tiny", "train.global_batch": "8", "train.seq_len": "32",
                             **{f"parallel.{k}": str(v) for k, v in flags.items()}})


@pytest.mark.parametrize("flags, world, message", [
    ({"tp": 3}, None, "parallel.tp=3 does not divide model.n_head=4; use one of [1, 2, 4]"),
    ({"tp": 4}, None, "parallel.tp=4 does not divide model.n_kv_head=2"),
    ({"tp": 2}, 3, "3 processes are not divisible by dp_replicate × tp × pp = 2"),
    ({"dp_shard": 2, "tp": 2}, 8, "= 4 but 8 processes were launched"),
    ({"zero": 0, "tp": 2}, None, "DDP) cannot wrap tensor-parallel weights"),
    ({"grad_compression": "bf16"}, None, "set parallel.zero=0"),
    ({"pp": 4, "pp_schedule": "interleaved-1f1b"}, None, "8 stages but model.n_layer=4"),
    ({"pp": 2, "pp_schedule": "zbv", "pp_stages_per_rank": 3}, None, "needs parallel.pp_stages_per_rank=2"),
    ({"pp": 2, "pp_microbatches": 3, "pp_schedule": "interleaved-1f1b"}, None, "multiple of parallel.pp=2"),
    ({"pp": 2, "pp_microbatches": 3}, 2, "must divide the per-rank batch 8"),
    ({"dp_shard": 16}, 16, "train.global_batch=8 is not divisible by the 16 data-parallel ranks"),
    ({"cpu_offload": "true", "zero": 1}, None, "cpu_offload needs FSDP2"),
])
def test_validation_says_what_to_change(flags, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        validate_parallel(cfg(**flags), world)


def test_sequence_parallel_needs_rope():
    with pytest.raises(ConfigError, match="needs model.pos='rope'"):
        build_config({}, {"model.preset": "tiny", "model.pos": "learned", "parallel.tp": "2",
                          "parallel.sequence_parallel": "true"})


def test_dp_shard_takes_the_remaining_ranks():
    d = validate_parallel(cfg(tp=2, pp=2), 8)
    assert (d["dp_replicate"], d["dp_shard"], d["tp"], d["pp"]) == (1, 2, 2, 2)
    assert d["microbatches"] == 2 and d["stages_per_rank"] == 1


def test_stage_split_is_balanced_and_covers_every_block():
    assert split_layers(4, 2) == [["0", "1"], ["2", "3"]]
    assert split_layers(5, 3) == [["0", "1"], ["2", "3"], ["4"]]
    assert stage_ids(0, 2, 2, "interleaved-1f1b") == [0, 2] and stage_ids(1, 2, 2, "zbv") == [1, 2]
    assert stage_owners(2, 2, "zbv") == [0, 1, 1, 0]  # V: rank 0 holds the first and the last stage
    assert stage_owners(2, 2, "interleaved-zb") == [0, 1, 0, 1]


def test_canonical_names_strip_wrappers_and_tie_the_head():
    assert canonical_name("module.layers.0._checkpoint_wrapped_module.mlp.w1.weight", False) == "layers.0.mlp.w1.weight"
    assert canonical_name("layers.3._orig_mod.attention.wq.weight", False) == "layers.3.attention.wq.weight"
    assert canonical_name("output.weight", True) == "tok_embeddings.weight"
    assert canonical_name("output.weight", False) == "output.weight"


def test_dcp_checkpoints_load_without_unpickling(tmp_path, monkeypatch):
    state = {"model.w": torch.arange(6.0).reshape(2, 3), "optim.w.step": torch.tensor(3.0)}
    dcp.save(state, storage_writer=JsonMetadataWriter(tmp_path / "ck"), no_dist=True)
    assert (tmp_path / "ck" / ".metadata.json").is_file() and (tmp_path / "ck" / ".metadata").is_file()
    md = read_metadata(tmp_path / "ck")
    assert sorted(md.state_dict_metadata) == sorted(state)

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    target = {"model.w": torch.zeros(2, 3), "optim.w.step": torch.tensor(0.0)}
    dcp.load(target, storage_reader=SafeReader(tmp_path / "ck"), no_dist=True)
    assert torch.equal(target["model.w"], state["model.w"]) and target["optim.w.step"].item() == 3.0


def test_non_tensor_entries_are_refused(tmp_path):
    dcp.save({"x": torch.ones(2), "note": {"a": 1}}, storage_writer=JsonMetadataWriter(tmp_path / "ck"),
             no_dist=True)
    with pytest.raises(BaseException) as info:  # CheckpointException derives from BaseException
        dcp.load({"x": torch.zeros(2), "note": {"a": 0}}, storage_reader=SafeReader(tmp_path / "ck"), no_dist=True)
    # DCP wraps the reader's error in a CheckpointException that carries the per-rank failures
    assert "non-tensor entries" in str(info.value) + "".join(map(str, getattr(info.value, "failures", {}).values()))


def test_comm_counter_counts_collective_payloads():
    import torch.distributed._functional_collectives as funcol

    from scalelm.parallel.comm import CommCounter

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with CommCounter() as counter:
            dist.all_reduce(torch.ones(10))                    # 40 bytes
            funcol.all_reduce(torch.ones(4, dtype=torch.bfloat16), "sum", dist.group.WORLD).wait()  # 8 bytes
            dist.all_reduce(torch.ones(3), async_op=True).wait()  # 12 bytes
        assert counter.bytes == 60
        assert dist.all_reduce.__name__ == "all_reduce"  # restored
    finally:
        dist.destroy_process_group()


class Exec(Exception):
    pass


def _fake_execv(seen):
    def execv(path, argv):  # like os.execv, never returns
        seen["argv"] = argv
        raise Exec

    return execv


def test_nproc_execs_torchrun(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.execv", _fake_execv(seen))
    args = ["--model.preset", "tiny", "--parallel.tp", "2", "--out", str(tmp_path / "r")]
    with pytest.raises(Exec):
        main(["train", "--nproc=2", *args])
    assert seen["argv"] == torchrun_command(2, "train", args)
    assert seen["argv"][1:8] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "scalelm"]


def test_max_restarts_goes_to_torchrun(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.execv", _fake_execv(seen))
    args = ["--model.preset", "tiny", "--out", str(tmp_path / "r")]
    with pytest.raises(Exec):
        main(["train", "--nproc", "2", "--max-restarts=3", *args])
    assert seen["argv"] == torchrun_command(2, "train", args, max_restarts=3)
    assert seen["argv"][4:8] == ["--nproc-per-node", "2", "--max-restarts", "3"]
    with pytest.raises(Exec):  # one process under torchrun, so that it is restarted too
        main(["train", "--max-restarts", "1", *args])
    assert seen["argv"] == torchrun_command(1, "train", args, max_restarts=1)


def test_nproc_validates_before_launching(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.execv", _fake_execv({}))
    assert main(["train", "--nproc", "3", "--model.preset", "tiny", "--parallel.tp", "2"]) == 2
    assert "3 processes are not divisible" in capsys.readouterr().err


def test_slurm_script(tmp_path, capsys):
    text = slurm_script(4, 8, 8, ["--model.preset", "gpt2-124m", "--out", "runs/x y"])
    assert "#SBATCH --nodes=4" in text and "#SBATCH --gpus-per-node=8" in text
    assert '--rdzv-backend c10d --rdzv-endpoint "$head_node:29500"' in text
    assert "--nproc-per-node 8" in text and "-m scalelm train --model.preset gpt2-124m --out 'runs/x y'" in text
    script = tmp_path / "job.sbatch"
    assert main(["slurm", "--nodes", "2", "--nproc-per-node", "2", "--gpus-per-node", "0", "--script", str(script),
                 "--model.preset", "tiny", "--parallel.tp", "2", "--out", "runs/t"]) == 0
    body = script.read_text()
    assert "--gpus-per-node" not in body and "--out runs/t" in body and body.startswith("#!/bin/bash")
    assert main(["slurm", "--nodes", "2", "--nproc-per-node", "2", "--script", "-", "--model.preset", "tiny",
                 "--parallel.tp", "3"]) == 2  # checked against 4 processes before anything is written
