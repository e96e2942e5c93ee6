"""Generated configs and command lines: whatever keys, values and flags arrive, the config builder answers with a
Config or one ConfigError/UsageError line — never another exception. In-process (no subprocess), so fast."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalelm.config import ConfigError, all_keys, build_config, parse_overrides
from scalelm.usage import UsageError

KEYS = all_keys()

# Keys as users get them wrong: real ones, near misses (a letter dropped, swapped case, other separators) and noise.
keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k[:-1]),
    st.sampled_from(KEYS).map(lambda k: k.replace(".", "_")),
    st.sampled_from(KEYS).map(str.upper),
    st.text(string.ascii_letters + "._-", min_size=1, max_size=20),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["auto", "true", "false", "nan", "inf", "-inf", "1e309", "0x10", "1_000",
                                           "tiny", "gpt2-124m", "cuda", "cpu", "fp32", "bf16", "muon", "-1", "0", ""]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=2))
# Values for the keys that reach the model and layout checks: small numbers, so they meet each other's rules.
layout = st.fixed_dictionaries({}, optional={
    "model.n_layer": st.integers(-1, 6), "model.n_head": st.integers(-1, 8), "model.n_kv_head": st.integers(-1, 8),
    "model.d_model": st.integers(-1, 64), "model.d_ff": st.integers(-1, 128), "model.vocab_size": st.integers(-1, 300),
    "model.max_seq_len": st.integers(-1, 128), "model.head_dim": st.integers(-1, 16),
    "parallel.tp": st.integers(-1, 8), "parallel.pp": st.integers(-1, 8), "parallel.dp_shard": st.integers(-2, 8),
    "parallel.dp_replicate": st.integers(-1, 4), "parallel.zero": st.integers(-1, 4),
    "parallel.pp_microbatches": st.integers(-1, 8), "parallel.pp_stages_per_rank": st.integers(-1, 4),
    "train.global_batch": st.integers(-1, 16), "train.micro_batch": st.integers(-1, 16),
    "train.seq_len": st.integers(-1, 200), "parallel.timeout_s": st.one_of(st.floats(-1, 1e3), st.just(float("nan"))),
})


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(file_values=st.dictionaries(keys, values, max_size=4), overrides=st.dictionaries(keys, values, max_size=4),
       shaped=layout)
def test_build_config_raises_only_config_errors(file_values, overrides, shaped):
    try:
        build_config({**file_values, **shaped}, overrides)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)


words = st.one_of(
    st.sampled_from([f"--{k}" for k in KEYS] + [f"--no-{k}" for k in KEYS] + ["--", "-", "--=", "--no-", "-x"]),
    st.sampled_from(KEYS).map(lambda k: f"--{k}="),
    scalars.map(str),
)


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=st.lists(words, max_size=8))
def test_command_lines_raise_only_config_or_usage_errors(argv):
    try:
        build_config({}, parse_overrides(argv))
    except (ConfigError, UsageError) as e:
        assert str(e) and "\n" not in str(e)
