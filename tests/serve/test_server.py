"""The OpenAI-compatible server, driven by the official openai client on a loopback port: each route and field of
the API against what the generation engine computes for the same prompt alone."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from serve.server import serving, tiny_run

from scalelm.infer import Generator, Sampling
from scalelm.infer.load import load_for_inference
from scalelm.serve.app import create_app
from scalelm.serve.template import TURN_STOPS, chat_prompt

KEY = "test-key"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def server(run):
    app = create_app(run, max_batch=8, api_key=KEY)
    with serving(app) as url:
        assert app.state.server.ready.wait(60), app.state.server.load_error
        yield url, app.state.server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def engine(run):
    return Generator(*load_for_inference(run))


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_answers_503_while_the_model_loads_then_200(run):
    gate = threading.Event()

    def loader():
        gate.wait()
        return load_for_inference(run)

    app = create_app(run, loader=loader)
    with serving(app) as url:
        status, body = _get(url + "/health")
        assert status == 503 and json.loads(body)["status"] == "loading"
        gate.set()
        assert app.state.server.ready.wait(60)
        assert _get(url + "/health")[0] == 200


def test_models_lists_the_run(client):
    assert [m.id for m in client.models.list().data] == ["run"]


def test_greedy_completion_is_the_engines_text_with_usage(client, engine):
    out = client.completions.create(model="run", prompt="Hello there", max_tokens=12, temperature=0)
    want = engine.generate("Hello there", 12, Sampling(0.0))[0]
    assert out.choices[0].text == want.text and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, 12, 23)


def test_chat_completion_continues_the_plain_template(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model="run", messages=messages, max_tokens=10, temperature=0)
    prompt = chat_prompt([("system", "Be brief."), ("user", "Hi")])
    assert prompt == "System: Be brief.\nUser: Hi\nAssistant:"
    want = engine.generate(prompt, 10, Sampling(0.0), stop=TURN_STOPS)[0]
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want.text
    assert out.usage.prompt_tokens == len(prompt)


def test_streamed_completion_adds_up_and_ends_with_a_usage_chunk(client, engine):
    chunks = list(client.completions.create(model="run", prompt="Hello", max_tokens=9, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == engine.generate("Hello", 9, Sampling(0.0))[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_chat_sends_the_role_then_the_text(client, engine):
    chunks = list(client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == engine.generate(chat_prompt([("user", "Hi")]), 6, Sampling(0.0), stop=TURN_STOPS)[0].text


def test_n_2_gives_two_choices_each_seeded_on_its_own(client, engine):
    out = client.completions.create(model="run", prompt="Once", max_tokens=15, n=2, seed=7)
    assert [c.index for c in out.choices] == [0, 1]
    want = [engine.generate("Once", 15, Sampling(1.0), seed=s)[0].text for s in (7, 8)]
    assert [c.text for c in out.choices] == want and want[0] != want[1]
    assert out.usage.completion_tokens == 30


def test_a_seed_reproduces_the_text_whatever_else_is_batched(client, engine, server):
    want = engine.generate("Seeded", 20, Sampling(0.9, top_p=0.95), seed=123)[0].text
    results = {}

    def ask(name, seed):
        results[name] = client.completions.create(model="run", prompt="Seeded", max_tokens=20, temperature=0.9,
                                                  top_p=0.95, seed=seed).choices[0].text

    threads = [threading.Thread(target=ask, args=(i, 123 if i < 3 else i)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(3)] == [want] * 3
    assert results[3] != want


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_ends_the_text_before_the_stop_string(client, engine, as_list):
    full = engine.generate("Stop", 30, Sampling(0.0))[0].text
    stop = full[10:12]  # two characters: two tokens of the char tokenizer, matched across their boundary
    out = client.completions.create(model="run", prompt="Stop", max_tokens=30, temperature=0,
                                    stop=["QQQ", stop] if as_list else stop)
    assert out.choices[0].text == full[:full.find(stop)] and out.choices[0].finish_reason == "stop"


def test_logprobs_are_the_engines_and_the_likeliest_tokens(client, engine):
    out = client.completions.create(model="run", prompt="Logs", max_tokens=8, temperature=0, logprobs=3)
    want = engine.generate("Logs", 8, Sampling(0.0), logprobs=True)[0]
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert lp.text_offset[0] == len("Logs")
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):  # greedy: the chosen token is the likeliest
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen, abs=1e-6)
    chat = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)


@pytest.mark.parametrize("fields,param", [
    (dict(max_tokens=5000), "max_tokens"),  # over the server's limit (the context: 1024)
    (dict(max_tokens=1020), "max_tokens"),  # fits the limit, not the context after the prompt
    (dict(prompt="a" * 1024), "prompt"),  # the prompt alone fills the context
    (dict(prompt="#"), "prompt"),  # a character the tokenizer does not have
    (dict(temperature="hot"), "temperature"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(n=9), "n"),  # more choices than one batch holds
    (dict(model="gpt-4"), "model"),
])
def test_bad_requests_get_openai_shaped_errors(client, fields, param):
    body = dict(model="run", prompt="Hello", max_tokens=4) | fields
    error = openai.NotFoundError if param == "model" else openai.BadRequestError
    with pytest.raises(error) as caught:
        client.completions.create(**body)
    assert caught.value.status_code == (404 if param == "model" else 400)
    assert set(caught.value.body) >= {"message", "type", "param", "code"} and caught.value.body["param"] == param


def test_a_wrong_api_key_is_401(server):
    wrong = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"


def test_a_client_that_disconnects_mid_stream_frees_its_rows(client, server):
    scheduler, metrics = server[1].scheduler, server[1].metrics
    scheduler.idle.wait(60)
    before = metrics.engine_tokens._value.get()
    stream = client.completions.create(model="run", prompt="Hi", max_tokens=1000, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    assert scheduler.idle.wait(60)
    assert metrics.cancelled._value.get() == 1
    assert metrics.engine_tokens._value.get() - before < 1000


def test_metrics_count_requests_tokens_and_batches(client, server):
    client.completions.create(model="run", prompt="Count", max_tokens=3, temperature=0)
    status, text = _get(server[0] + "/metrics")
    assert status == 200
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines['scalelm_requests_total{route="/v1/completions",status="200"}']) >= 1
    assert float(lines["scalelm_completion_tokens_total"]) >= 3
    assert float(lines["scalelm_batch_size_count"]) >= 1
    assert "scalelm_time_to_first_token_seconds_bucket" in text


class _Gated(torch.nn.Module):
    """The run's model, whose decode steps wait for `gate`: the test decides when the engine may go on."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.cfg, self.gate, self.calls = model, model.cfg, threading.Event(), 0

    def forward(self, tokens, cache=None):
        self.calls += 1
        if self.calls > 1:
            self.gate.wait()
        return self.model(tokens, cache=cache)


def test_a_client_that_leaves_before_a_whole_response_frees_its_rows(run):
    model, tokenizer = load_for_inference(run)
    gated = _Gated(model)
    app = create_app(run, loader=lambda: (gated, tokenizer))
    with serving(app) as url:
        state = app.state.server
        assert state.ready.wait(60)
        impatient = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):  # the engine is held at its first decode step
            impatient.completions.create(model="run", prompt="Hi", max_tokens=500, temperature=0)
        deadline = time.monotonic() + 60
        while state.metrics.cancelled._value.get() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # the server looks for the disconnect once a second
        gated.gate.set()
        assert state.scheduler.idle.wait(60)
        assert state.metrics.cancelled._value.get() == 1
        assert state.metrics.engine_tokens._value.get() <= 2  # the token before the gate, and at most one after


def test_a_body_that_is_not_json_is_a_400(server):
    request = urllib.request.Request(server[0] + "/v1/completions", data=b"{not json", method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    assert caught.value.code == 400
    error = json.loads(caught.value.read())["error"]
    assert error["type"] == "invalid_request_error" and "not valid JSON" in error["message"]


def test_several_prompts_times_n_are_choices_in_order_each_with_its_own_seed(client, engine):
    out = client.completions.create(model="run", prompt=["Hi", "Yo"], n=2, max_tokens=6, seed=11)
    want = [engine.generate(p, 6, Sampling(1.0), seed=11 + i)[0].text for i, p in enumerate(["Hi", "Hi", "Yo", "Yo"])]
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and [c.text for c in out.choices] == want
