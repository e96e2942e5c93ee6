import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelm.data import BatchLoader, DataError, eval_batches

# Token i has value i, so every window shows where it came from.
TOKENS = np.arange(1000, dtype=np.uint16)


def test_windows_are_contiguous_and_shifted():
    loader = BatchLoader(TOKENS, seq_len=8, global_batch=4, seed=0)
    x, y = loader.batch_at(3)
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    starts = torch.from_numpy(loader.global_starts(3))
    assert torch.equal(x, starts[:, None] + torch.arange(8))
    assert torch.equal(y, x + 1)


def test_starts_cover_the_split_and_stay_inside():
    loader = BatchLoader(TOKENS[:20], seq_len=8, global_batch=64, seed=0)
    starts = np.concatenate([loader.global_starts(s) for s in range(20)])
    assert starts.dtype == np.int64
    assert starts.min() == 0 and starts.max() == 20 - 8 - 1  # the last window's target is the last token


def test_data_stream_is_pinned():
    """The stream is a contract between a checkpoint and the code that resumes it; numpy must not move it."""
    loader = BatchLoader(TOKENS, seq_len=8, global_batch=4, seed=1337)
    assert loader.global_starts(0).tolist() == [541, 871, 721, 184]
    assert loader.global_starts(7).tolist() == [745, 77, 166, 922]


def test_batch_depends_on_seed_and_step_only():
    a = BatchLoader(TOKENS, seq_len=8, global_batch=4, seed=1)
    b = BatchLoader(TOKENS, seq_len=8, global_batch=4, seed=1)
    for _ in range(5):
        a.next_batch()
    assert a.step == 5
    assert torch.equal(a.next_batch()[0], b.batch_at(5)[0])
    assert not torch.equal(b.batch_at(5)[0], BatchLoader(TOKENS, 8, 4, seed=2).batch_at(5)[0])
    assert not torch.equal(b.batch_at(5)[0], b.batch_at(6)[0])


@settings(max_examples=25, deadline=None)
@given(dp_size=st.sampled_from([1, 2, 3, 6]), step=st.integers(0, 10_000), seed=st.integers(0, 2**32))
def test_ranks_concatenate_to_the_global_batch(dp_size, step, seed):
    whole = BatchLoader(TOKENS, seq_len=5, global_batch=6, seed=seed).batch_at(step)
    parts = [
        BatchLoader(TOKENS, seq_len=5, global_batch=6, seed=seed, dp_rank=r, dp_size=dp_size).batch_at(step)
        for r in range(dp_size)
    ]
    assert all(x.shape == (6 // dp_size, 5) for x, _ in parts)
    assert torch.equal(torch.cat([x for x, _ in parts]), whole[0])
    assert torch.equal(torch.cat([y for _, y in parts]), whole[1])


def test_resume_continues_identically_even_on_other_ranks():
    run = BatchLoader(TOKENS, seq_len=8, global_batch=4, seed=7)
    for _ in range(3):
        run.next_batch()
    state = run.state_dict()
    assert state == {"step": 3, "seed": 7, "seq_len": 8, "global_batch": 4}
    state = json.loads(json.dumps(state))  # plain ints survive any checkpoint format
    expected = [run.next_batch()[0] for _ in range(2)]

    same = BatchLoader(TOKENS, seq_len=8, global_batch=4, seed=0)
    same.load_state_dict(state)
    assert all(torch.equal(same.next_batch()[0], x) for x in expected)

    ranks = [BatchLoader(TOKENS, seq_len=8, global_batch=4, seed=0, dp_rank=r, dp_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    for x in expected:
        assert torch.equal(torch.cat([loader.next_batch()[0] for loader in ranks]), x)


@pytest.mark.parametrize("key", ["seq_len", "global_batch"])
def test_resume_refuses_a_different_shape(key):
    state = BatchLoader(TOKENS, seq_len=8, global_batch=4, seed=0).state_dict()
    other = BatchLoader(TOKENS, seq_len=8, global_batch=4, seed=0)
    with pytest.raises(DataError, match=f"resume with {key}="):
        other.load_state_dict({**state, key: 16})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"global_batch": 6, "dp_size": 4}, "dp_size=4 does not divide global_batch=6"),
        ({"dp_rank": 2, "dp_size": 2}, r"dp_rank=2 must lie in \[0, dp_size=2\)"),
        ({"seq_len": 999}, "not more than seq_len \\+ 1 = 1000; use a shorter seq_len"),
        ({"seq_len": 0}, "seq_len=0 must be at least 1"),
        ({"seed": -1}, "seed=-1 must be non-negative"),
    ],
)
def test_loader_validation(kwargs, message):
    args = {"seq_len": 8, "global_batch": 4, "seed": 0, **kwargs}
    with pytest.raises(DataError, match=message):
        BatchLoader(TOKENS, **args)


def test_eval_batches_are_fixed_and_span_the_split():
    batches = eval_batches(TOKENS, seq_len=8, batch=3, n_batches=4)
    assert len(batches) == 4
    assert all(x.shape == y.shape == (3, 8) and torch.equal(y, x + 1) for x, y in batches)
    again = eval_batches(TOKENS, seq_len=8, batch=3, n_batches=4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    starts = [int(x[0]) for xs, _ in batches for x in xs]
    assert starts[0] == 0 and starts[-1] == 1000 - 8 - 1
    assert starts == sorted(starts)
    with pytest.raises(DataError, match="validation split has 9 tokens"):
        eval_batches(TOKENS[:9], seq_len=8, batch=1, n_batches=1)
