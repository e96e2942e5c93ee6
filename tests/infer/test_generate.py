"""The generation engine: the KV cache computes what recomputation does, rows of a batch what they would alone,
sampling is reproducible, stop strings and end tokens end a row, streamed pieces add up to the text."""

from dataclasses import replace

import pytest
import torch

from scalelm.data.tokenizer import CharTokenizer
from scalelm.infer import GenerationError, Generator, Sampling
from scalelm.infer.generate import auto_decode_kernels
from scalelm.infer.stops import StopText
from scalelm.kernels.cpu.linear import OneDNNLinear, onednn_available
from scalelm.model import get_preset
from scalelm.model.gpt import GPT, KVCache

VARIANTS = {
    "gqa-rope": {},
    "mha-learned": dict(mlp="gelu", pos="learned", norm="layernorm", bias=True, tie_embeddings=False, n_kv_head=None),
    "mha-sinusoidal": dict(pos="sinusoidal", n_kv_head=None),
}
TOKENIZER = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ,.!?\n")
GREEDY = Sampling(temperature=0.0)


def _model(variant: str, **changes) -> GPT:
    torch.manual_seed(0)
    return GPT(replace(get_preset("tiny"), vocab_size=64, **VARIANTS[variant], **changes)).eval()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prompt_len", [1, 7, 40])
def test_cached_logits_equal_recomputed_logits(variant, prompt_len):
    """Prefill, then one token at a time from the cache: each step's logits are those of the whole sequence run
    again without a cache."""
    model = _model(variant)
    ids = torch.randint(0, 32, (1, prompt_len + 12))
    cache = KVCache(model.cfg.n_layer, ids.shape[1], pad=torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        cache.prepare(prompt_len)
        steps = [model(ids[:, :prompt_len], cache=cache)[:, -1]]
        cache.advance()
        for t in range(prompt_len, ids.shape[1]):
            cache.prepare(1)
            steps.append(model(ids[:, t:t + 1], cache=cache)[:, -1])
            cache.advance()
        for t, got in enumerate(steps):
            want = model(ids[:, :prompt_len + t])[:, -1]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_with_the_cache_gives_the_tokens_of_decoding_without_it(variant):
    gen = Generator(_model(variant), TOKENIZER)
    prompts = ["to be or not", "a", "the quick brown fox jumps over"]
    cached = gen.generate(prompts, 30, GREEDY)
    recomputed = gen.generate(prompts, 30, GREEDY, use_cache=False)
    assert [c.tokens for c in cached] == [r.tokens for r in recomputed]
    assert all(len(c.tokens) == 30 and c.finish_reason == "length" for c in cached)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_row_of_a_mixed_length_batch_equals_its_prompt_alone(variant):
    gen = Generator(_model(variant), TOKENIZER)
    prompts = ["hello there", "x", "a much longer prompt than the others, by far", "mid length"]
    batch = gen.generate(prompts, 20, GREEDY, logprobs=True)
    for prompt, row in zip(prompts, batch):
        alone = gen.generate(prompt, 20, GREEDY, logprobs=True)[0]
        assert row.tokens == alone.tokens and row.text == alone.text
        torch.testing.assert_close(torch.tensor(row.logprobs), torch.tensor(alone.logprobs), rtol=0, atol=1e-5)


def test_seeded_sampling_is_reproducible_and_the_seed_matters():
    gen = Generator(_model("gqa-rope"), TOKENIZER)
    sampling = Sampling(temperature=1.0, top_k=20, top_p=0.95)
    first = gen.generate(["once upon", "a time"], 40, sampling, seed=7)
    again = gen.generate(["once upon", "a time"], 40, sampling, seed=7)
    other = gen.generate(["once upon", "a time"], 40, sampling, seed=8)
    assert [c.tokens for c in first] == [c.tokens for c in again]
    assert [c.tokens for c in first] != [c.tokens for c in other]
    uncached = gen.generate(["once upon", "a time"], 40, sampling, seed=7, use_cache=False)
    assert [c.tokens for c in uncached] == [c.tokens for c in first]  # the same draws from the same generator


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    gen = Generator(_model("gqa-rope"), TOKENIZER)
    greedy = gen.generate("abc", 25, GREEDY)[0].tokens
    assert gen.generate("abc", 25, Sampling(temperature=1.5, top_k=1), seed=1)[0].tokens == greedy
    assert gen.generate("abc", 25, Sampling(temperature=1.5, top_p=1e-6), seed=1)[0].tokens == greedy


def test_sampled_tokens_stay_inside_the_tokenizers_vocabulary():
    """The embedding is padded to 64 rows for a 32-character tokenizer: rows past it are never sampled."""
    gen = Generator(_model("gqa-rope"), TOKENIZER)
    tokens = gen.generate(["a", "b"], 200, Sampling(temperature=5.0), seed=0)
    assert max(max(c.tokens) for c in tokens) < TOKENIZER.vocab_size


def test_stop_string_ends_the_row_and_is_not_part_of_the_text():
    gen = Generator(_model("gqa-rope"), TOKENIZER)
    full = gen.generate("stop here", 40, GREEDY)[0]
    stop = full.text[10:13]  # a string the model will produce, spanning several (character) tokens
    first = full.text.find(stop)
    stopped = gen.generate("stop here", 40, GREEDY, stop=["never appears!", stop])[0]
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:first]
    assert len(stopped.tokens) == first + len(stop)  # it ended on the token that completed the stop string


def test_end_token_ends_the_row_and_is_not_part_of_it():
    gen = Generator(_model("gqa-rope"), TOKENIZER)
    full = gen.generate("the end", 30, GREEDY)[0]
    eos = full.tokens[5]
    first = full.tokens.index(eos)
    ended = gen.generate("the end", 30, GREEDY, eos_id=eos)[0]
    assert ended.finish_reason == "stop" and ended.tokens == full.tokens[:first]
    assert ended.text == TOKENIZER.decode(full.tokens[:first])


def test_streamed_pieces_add_up_to_the_text_and_each_row_ends_once():
    gen = Generator(_model("gqa-rope"), TOKENIZER)
    prompts = ["one", "two two"]
    final = gen.generate(prompts, 30, GREEDY, stop=["zz"])
    pieces, ends = {0: [], 1: []}, {0: 0, 1: 0}
    for delta in gen.stream(prompts, 30, GREEDY, stop=["zz"]):
        pieces[delta.index].append(delta.text)
        ends[delta.index] += delta.finish_reason is not None
    assert ["".join(pieces[i]) for i in (0, 1)] == [c.text for c in final]
    assert ends == {0: 1, 1: 1}


def test_generation_stops_at_the_context():
    gen = Generator(_model("gqa-rope", max_seq_len=32), TOKENIZER)
    out = gen.generate("a" * 30, 10, GREEDY)[0]
    assert len(out.tokens) == 2 and out.finish_reason == "length"


@pytest.mark.parametrize("prompt,message", [("", "empty"), ("a" * 32, "context"), ("ABC", "cannot be encoded")])
def test_bad_prompts_are_one_line_errors(prompt, message):
    gen = Generator(_model("gqa-rope", max_seq_len=32), TOKENIZER)
    with pytest.raises(GenerationError, match=message):
        gen.generate(prompt, 5)


def test_sampling_settings_are_checked():
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=2.0)):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_stop_text_holds_back_what_could_begin_a_stop_string():
    stops = StopText(["END"])
    assert stops.feed("hello E") == "hello "  # "E" may begin "END"
    assert stops.feed("hello EN") == ""
    assert stops.feed("hello ENx") == "ENx"  # it did not
    assert stops.feed("hello ENx and END more") == " and "
    assert stops.stopped and stops.text == "hello ENx and "


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
def test_onednn_linear_layers_generate_the_same_tokens():
    prompts = ["to be or not", "a"]
    plain = Generator(_model("mha-learned"), TOKENIZER).generate(prompts, 30, GREEDY, logprobs=True)
    swapped = Generator(_model("mha-learned"), TOKENIZER, cpu_matmul="onednn")
    assert isinstance(swapped.model.output, OneDNNLinear)
    for a, b in zip(plain, swapped.generate(prompts, 30, GREEDY, logprobs=True)):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)


def test_decode_threads_change_no_token_and_are_restored():
    """A small CPU model decodes on one intra-op thread by default; any thread count gives the same tokens, and
    PyTorch's setting is the caller's again between the streamed pieces and after them."""
    before = torch.get_num_threads()
    prompts = ["to be or not", "a"]
    default = Generator(_model("gqa-rope"), TOKENIZER)
    assert default.decode_threads == 1
    want = [c.tokens for c in default.generate(prompts, 20, GREEDY)]
    for threads in (0, 2):
        gen = Generator(_model("gqa-rope"), TOKENIZER, decode_threads=threads)
        assert [c.tokens for c in gen.generate(prompts, 20, GREEDY)] == want
    for _ in default.stream(prompts, 5, GREEDY):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_decode_kernels_generate_the_tokens_of_pytorchs_linear_layers():
    """The engine's few-row linear kernel (a large CPU model's default) changes how decode steps multiply, not
    what."""
    prompts = ["to be or not", "a"]
    plain = Generator(_model("mha-learned"), TOKENIZER, decode_kernels=False)
    assert type(plain.model.output) is torch.nn.Linear
    kernel = Generator(_model("mha-learned"), TOKENIZER, decode_kernels=True)
    for a, b in zip(plain.generate(prompts, 30, GREEDY, logprobs=True),
                    kernel.generate(prompts, 30, GREEDY, logprobs=True)):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)


def test_the_decode_kernel_is_the_default_for_a_large_cpu_model_only():
    """A small model's steps are dispatch-bound (PyTorch's layers, one thread); a large one's stream weights."""
    small, large = torch.nn.Linear(64, 64), torch.nn.Linear(4096, 4096)  # 16 KiB and 64 MiB of weights
    assert not auto_decode_kernels(small) and auto_decode_kernels(large)
    assert not auto_decode_kernels(torch.nn.Linear(4096, 4096, device="meta"))
    assert type(Generator(_model("mha-learned"), TOKENIZER).model.output) is torch.nn.Linear
