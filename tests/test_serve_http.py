"""`peftkit serve`'s HTTP API (issue #17), through a live uvicorn server and the official `openai` client."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from peftkit.serve.http import create_app
from peftkit.serve.metrics import ServeMetrics

from .serve_checks import FakeEngine, FakeStore, live_server

KEY = "sesame"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[str, FakeEngine, FakeStore]]:
    store = FakeStore(root=tmp_path)
    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        store.register(name, tmp_path / name)
    engine = FakeEngine(store, delay=0.01)
    with live_server(create_app(engine, store, metrics=ServeMetrics(store))) as url:
        yield url, engine, store


def _error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert all(word in error["message"] for word in words), error["message"]
    return error


def test_completions_and_chat_through_the_openai_client(fake) -> None:
    url, engine, _ = fake
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    done = client.completions.create(model="alpha", prompt="hi", max_tokens=3)
    assert done.choices[0].text == " alpha0 alpha1 alpha2" and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (2, 3, 5)

    chat = client.chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2)
    assert chat.choices[0].message.content == " base0 base1" and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(engine.chat_ids([{"role": "user", "content": "hi"}]))


def test_streams_are_openai_chunks_with_usage_last(fake) -> None:
    url, _, _ = fake
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    chunks = list(client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " beta0 beta1 beta2"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])

    pieces = list(client.completions.create(model="alpha", prompt="x", max_tokens=2, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == " alpha0 alpha1"
    assert all(p.usage is None for p in pieces)


def test_raw_stream_ends_with_done(fake) -> None:
    url, _, _ = fake
    with httpx.stream("POST", f"{url}/v1/completions",
                      json={"model": "alpha", "prompt": "x", "max_tokens": 2, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert len(lines) == 4  # two pieces, the finish chunk, [DONE]


@pytest.mark.parametrize("body, status, words", [
    ({"model": "gamma", "prompt": "x"}, 404, ["gamma"]),
    ({"model": "alpha", "prompt": "x" * 60, "max_tokens": 10}, 400, ["64"]),
    ({"model": "alpha", "prompt": "x", "max_tokens": 0}, 400, ["max_tokens", "greater than or equal to 1"]),
    ({"model": "alpha", "prompt": "x", "temperature": "hot"}, 400, ["temperature"]),
    ({"model": "alpha", "prompt": "x", "logprobs": 2}, 400, ["logprobs: unknown field"]),
    ({"model": "alpha", "prompt": "x", "n": 2}, 400, ["n: only 1 is supported"]),
    ({"model": "alpha", "prompt": "x", "presence_penalty": 0.5}, 400, ["presence_penalty: only 0.0"]),
    ({"model": "alpha", "prompt": "x", "stream_options": {"include_usage": True}}, 400, ["stream: true"]),
    ({"prompt": "x"}, 400, ["model: Field required"]),
])
def test_completion_errors_name_the_problem(fake, body: dict, status: int, words: list[str]) -> None:
    url, _, _ = fake
    _error(httpx.post(f"{url}/v1/completions", json=body), status, *words)


@pytest.mark.parametrize("body, words", [
    ({"model": "alpha", "messages": []}, ["messages: List should have at least 1 item"]),
    ({"model": "alpha", "messages": [{"role": "robot", "content": "x"}]}, ["messages.0.role"]),
    ({"model": "alpha", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]},
     ["messages.0.content"]),
    ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
      "max_completion_tokens": 4}, ["max_tokens and max_completion_tokens differ"]),
    ({"model": "alpha", "messages": [{"role": "user", "content": "x" * 80}]}, ["the context holds 64"]),
])
def test_chat_errors_name_the_problem(fake, body: dict, words: list[str]) -> None:
    url, _, _ = fake
    error = _error(httpx.post(f"{url}/v1/chat/completions", json=body), 400, *words)
    assert error["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_route(fake) -> None:
    url, _, _ = fake
    _error(httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
           400, "not valid JSON")
    _error(httpx.get(f"{url}/v1/nothing"), 404, "/v1/nothing")


def test_full_queue_is_429_and_frees_again(fake) -> None:
    url, engine, _ = fake
    body = {"model": "alpha", "prompt": "x", "max_tokens": 40, "stream": True}
    with httpx.Client(base_url=url) as client:
        streams = [client.stream("POST", "/v1/completions", json=body) for _ in range(engine.max_queue)]
        for stream in streams:
            stream.__enter__()
        error = _error(client.post("/v1/completions", json=body), 429, "waiting")
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        for stream in streams:
            stream.__exit__(None, None, None)
    _wait(lambda: not engine.running)
    assert httpx.post(f"{url}/v1/completions", json={**body, "stream": False}).status_code == 200


def test_client_disconnect_cancels_its_request(fake) -> None:
    url, engine, _ = fake
    body = {"model": "alpha", "prompt": "x", "max_tokens": 50, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        next(response.iter_lines())
    _wait(lambda: len(engine.cancelled) == 1)
    assert not engine.running
    with pytest.raises(httpx.ReadTimeout):  # non-streaming: the server notices the hang-up too
        httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=0.1)
    _wait(lambda: len(engine.cancelled) == 2)


def _wait(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_models_load_and_unload(fake, tmp_path: Path) -> None:
    url, _, store = fake
    ids = lambda: [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]  # noqa: E731
    assert ids() == ["fake-base", "alpha", "beta"]
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][1]["parent"] == "fake-base"
    (tmp_path / "gamma").mkdir()
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(tmp_path / "gamma")})
    assert loaded.status_code == 200 and "gamma" in loaded.text and ids()[-1] == "gamma"
    _error(httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(tmp_path)}), 400,
           "already registered")
    _error(httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "..")}), 403,
           "outside")
    _error(httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "fake-base", "lora_path": "a"}), 400,
           "base model's name")
    _error(httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x"}), 400, "lora_path: Field required")
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 200
    assert "gamma" not in ids()
    _error(httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "gamma"}), 404, "gamma")


def test_metrics_text(fake) -> None:
    url, _, _ = fake
    httpx.post(f"{url}/v1/completions", json={"model": "nobody", "prompt": "x"})
    text = httpx.get(f"{url}/metrics").text
    for line in ("peftkit_adapter_cache_hits_total 3.0", "peftkit_adapter_cache_misses_total 2.0",
                 "peftkit_adapter_cache_evictions_total 1.0", "peftkit_adapters_registered 2.0",
                 'peftkit_requests_refused_total{code="model_not_found"} 1.0'):
        assert line in text.splitlines(), line
    for name in ("peftkit_time_to_first_token_seconds_bucket", "peftkit_time_per_output_token_seconds_bucket",
                 "peftkit_generated_tokens_total", "peftkit_running_requests", "peftkit_queued_requests"):
        assert name in text, name


def test_api_key(tmp_path: Path) -> None:
    store = FakeStore()
    with live_server(create_app(FakeEngine(store), store, api_key=KEY)) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for path in ("/v1/models", "/metrics"):
                _error(httpx.get(f"{url}{path}", headers=headers), 401, "API key")
        # the key is checked before the body: a stranger learns nothing about the API from its errors
        _error(httpx.post(f"{url}/v1/completions", json={"bad": 1}), 401, "API key")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
        assert client.completions.create(model="fake-base", prompt="x", max_tokens=1).choices[0].text == " base0"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").models.list()


def test_embeddings_need_an_encoder(fake) -> None:
    url, _, _ = fake
    _error(httpx.post(f"{url}/v1/embeddings", json={"model": "alpha", "input": "x"}), 404, "--model minilm")
