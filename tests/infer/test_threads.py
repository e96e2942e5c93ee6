"""The decode steps' thread count, chosen by timing: each candidate once, then the fastest, probing the others."""

import torch

from scalelm.data.tokenizer import CharTokenizer
from scalelm.infer import Generator, Sampling
from scalelm.infer.threads import ThreadChoice
from scalelm.model import get_preset
from scalelm.model.gpt import GPT


def test_each_candidate_is_timed_then_the_fastest_is_kept_and_the_other_probed():
    choice = ThreadChoice((0, 1), probe_every=4, smoothing=0.5)
    picks = []
    for step in range(1, 13):
        threads = choice.pick()
        picks.append(threads)
        quiet = step <= 5  # all threads take 1 s a step, one thread 2 s; then the machine gets busy: 3 s vs 2 s
        choice.record(threads, {0: 1.0, 1: 2.0}[threads] if quiet else {0: 3.0, 1: 2.0}[threads])
    # 1-2: each timed; 3-7: all threads (step 4 probes one thread); the busy steps raise all threads' smoothed time
    # past one thread's by step 8, which probes all threads again; from 9 on one thread, step 12 probing.
    assert picks == [0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0]
    assert choice.seconds[1, 0] > choice.seconds[1, 1]


def test_steps_of_other_batches_are_timed_apart():
    choice = ThreadChoice((0, 1))
    for threads, seconds in ((0, 1.0), (1, 2.0)):
        assert choice.pick(key=1) == threads
        choice.record(threads, seconds, key=1)
    assert choice.pick(key=8) == 0  # batch 8 has no times yet: it measures its own
    assert choice.pick(key=1) == 0


def test_switching_threads_mid_generation_keeps_the_tokens():
    torch.manual_seed(0)
    model = GPT(get_preset("tiny")).eval()
    tokenizer = CharTokenizer.from_text("".join(chr(c) for c in range(32, 127)))
    prompts = ["to be or not", "a"]
    fixed = Generator(model, tokenizer, decode_threads=1, decode_kernels=True)
    want = [c.tokens for c in fixed.generate(prompts, 24, Sampling(temperature=0.0))]
    switching = Generator(model, tokenizer, decode_threads=1, decode_kernels=True)
    switching.thread_choice = ThreadChoice((0, 1), probe_every=2)  # a switch every other step
    assert [c.tokens for c in switching.generate(prompts, 24, Sampling(temperature=0.0))] == want
    assert {threads for (_, threads) in switching.thread_choice.seconds} == {0, 1}
