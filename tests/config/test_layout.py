"""Layout rules (`scalelm.config.layout`): train.micro_batch means sequences per forward/backward under pipeline
parallelism too, and every consumer of the pipeline's micro-batch count takes the number validate_parallel
resolves. Config-level only: no process group."""

import pytest

from scalelm.config import ConfigError, build_config, validate_parallel


def cfg(**flags: str):
    """The tiny model, global batch 8, with dotted `section__key` overrides."""
    return build_config({}, {"model.preset": "tiny", "train.global_batch": "8", "train.seq_len": "32",
                             **{k.replace("__", "."): str(v) for k, v in flags.items()}})


@pytest.mark.parametrize("world, micro_batch, expected", [
    (2, 2, 4),  # dp 1: per-rank batch 8 / 2
    (2, 4, 2),
    (4, 2, 2),  # dp 2: per-rank batch 4 / 2
    (4, 1, 4),
])
def test_micro_batch_sets_the_pipeline_micro_batches(world, micro_batch, expected):
    c = cfg(parallel__pp=2, train__micro_batch=micro_batch)  # accepted by build_config (was refused)
    assert validate_parallel(c, world)["microbatches"] == expected


def test_without_micro_batch_the_count_is_pp_microbatches_or_pp():
    assert validate_parallel(cfg(parallel__pp=2), 2)["microbatches"] == 2
    assert validate_parallel(cfg(parallel__pp=2, parallel__pp_microbatches=4), 2)["microbatches"] == 4


def test_both_set_and_agreeing_is_fine():
    c = cfg(parallel__pp=2, train__micro_batch=2, parallel__pp_microbatches=4)
    assert validate_parallel(c, 2)["microbatches"] == 4


def test_both_set_and_disagreeing_is_one_line_naming_the_fix():
    c = cfg(parallel__pp=2, train__micro_batch=2, parallel__pp_microbatches=2)
    with pytest.raises(ConfigError) as exc:
        validate_parallel(c, 2)
    message = str(exc.value)
    assert "\n" not in message
    assert "train.micro_batch=2 splits the per-rank batch 8 into 4 pipeline micro-batches" in message
    assert "parallel.pp_microbatches=0 or train.micro_batch=4" in message


def test_a_disagreement_is_caught_without_the_world_size_when_dp_is_explicit():
    with pytest.raises(ConfigError, match="set only one of them"):
        cfg(parallel__pp=2, parallel__dp_shard=1, train__micro_batch=2, parallel__pp_microbatches=2)


@pytest.mark.parametrize("flags, world, message", [
    ({"train__micro_batch": 8}, 2, r"train.micro_batch=8 \(8 per-rank / 8 = 1 pipeline micro-batches\): the 1f1b "
                                   r"schedule needs at least parallel.pp=2 micro-batches per step; lower train.micro_batch"),
    ({"train__micro_batch": 2, "train__global_batch": 6, "parallel__pp_schedule": "interleaved-1f1b"}, 2,
     "= 3 pipeline micro-batches.* must be a multiple of parallel.pp=2 for the interleaved-1f1b schedule"),
    ({"train__micro_batch": 3}, 2, "train.micro_batch=3 does not divide train.global_batch=8"),
    ({"train__micro_batch": 8}, 4, "train.micro_batch=8 does not divide the per-rank batch 4"),
])
def test_micro_batch_under_pp_is_checked_like_pp_microbatches(flags, world, message):
    with pytest.raises(ConfigError, match=message):
        validate_parallel(cfg(parallel__pp=2, **flags), world)


def test_consumers_use_the_resolved_count():
    """The perf model's layout (train.forecast) and the parallel dims (the schedule's n_microbatches) agree."""
    from scalelm.parallel.dims import ParallelDims
    from scalelm.train.forecast import perf_layout

    c = cfg(parallel__pp=2, train__micro_batch=2)
    assert ParallelDims.from_config(c, 2).microbatches == 4
    lo = perf_layout(c, 2, "fp32")
    assert (lo.pp, lo.micro_batch) == (2, 2)
    assert perf_layout(cfg(parallel__pp=2, parallel__pp_microbatches=4), 2, "fp32").micro_batch == 2
