"""`peftkit serve`'s HTTP API (issue #17), through a live uvicorn server and the official `openai` client."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch

import peftkit
from peftkit import LoRA
from peftkit.models import load_minilm
from peftkit.serve import SamplingParams
from peftkit.cli import main
from peftkit.serve.cli import ServeSettings, build_server, parse_size
from peftkit.serve.engine import Engine
from peftkit.serve.http import create_app
from peftkit.serve.metrics import ServeMetrics

from .serve_http_checks import (ADAPTERS, FakeEngine, FakeStore, live_server, save_adapters, save_classifier,
                                solo_answer, tiny_server)

KEY = "sesame"
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft's own noise


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
    ({"model": "alpha", "messages": [{"role": "user", "content": "x" * 80}]}, ["97 tokens leave no room"]),
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


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/classify"])
def test_encoder_endpoints_need_an_encoder(fake, path: str) -> None:
    url, _, _ = fake
    _error(httpx.post(f"{url}{path}", json={"model": "alpha", "input": "x"}), 404, "--model minilm")


# --- the real engine: a tiny random Llama with SmolLM2's tokenizer; adapters of six methods, one saved by peft ------

@dataclass
class Live:
    url: str
    engine: Engine
    reference: torch.nn.Module  # the base with every adapter attached, for solo answers

    def solo(self, model: str, prompt_ids: list[int], max_tokens: int) -> tuple[str, int]:
        return solo_answer(self.reference, None if model == "tiny" else model, prompt_ids, max_tokens)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("adapters")
    reference = save_adapters(root)
    server = tiny_server(root, max_loaded=3)  # fewer places than adapters: the store evicts
    server.start()
    try:
        with live_server(server.app) as url:
            yield Live(url, server.engine, reference)
    finally:
        server.stop()


@pytest.mark.parametrize("model", ["tiny", "lora", "ia3", "prefix", "peft-lora"])
def test_greedy_answers_equal_generate_alone(real: Live, model: str) -> None:
    client = openai.OpenAI(base_url=f"{real.url}/v1", api_key="unused")
    prompt, messages = "The weather today", [{"role": "user", "content": "Tell me a story"}]
    text, tokens = real.solo(model, real.engine.prompt_ids(prompt), 8)
    done = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert (done.choices[0].text, done.usage.completion_tokens) == (text, tokens)
    streamed = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text

    text, tokens = real.solo(model, real.engine.chat_ids(messages), 6)
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    assert (chat.choices[0].message.content, chat.usage.completion_tokens) == (text, tokens)
    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                              stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == text


def test_the_adapters_really_differ(real: Live) -> None:
    ids = real.engine.prompt_ids("The weather today")
    answers = {name: real.solo(name, ids, 8)[0] for name in ["tiny", *ADAPTERS]}
    assert len(set(answers.values())) == len(answers), answers


def test_32_concurrent_requests_over_8_adapters(real: Live) -> None:
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    jobs = [(ADAPTERS[i % 8], " ".join(words[:1 + (5 * i) % 12]), 3 + (7 * i) % 10) for i in range(32)]

    async def ask_all() -> list[tuple[str, int]]:
        client = openai.AsyncOpenAI(base_url=f"{real.url}/v1", api_key="unused", max_retries=0)
        replies = await asyncio.gather(*(client.completions.create(model=name, prompt=prompt, max_tokens=n,
                                                                   temperature=0) for name, prompt, n in jobs))
        return [(reply.choices[0].text, reply.usage.completion_tokens) for reply in replies]

    answers = asyncio.run(ask_all())
    assert answers == [real.solo(name, real.engine.prompt_ids(prompt), n) for name, prompt, n in jobs]
    assert httpx.get(f"{real.url}/health").status_code == 200
    assert _value(httpx.get(f"{real.url}/metrics").text, "peftkit_adapter_cache_evictions_total") > 0


def _value(text: str, name: str) -> float:
    """A metric's value in Prometheus text (`name` with its labels, as printed)."""
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_errors_and_disconnect_with_the_real_engine(real: Live, tmp_path: Path) -> None:
    url = real.url
    _error(httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 200}), 400,
           "context of 128")
    _error(httpx.post(f"{url}/v1/completions", json={"model": "lora-z", "prompt": "x"}), 404, "lora-z")
    _error(httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)}), 403,
           "outside the adapter root")
    aborted = 'peftkit_requests_finished_total{reason="abort"}'
    before = _value(httpx.get(f"{url}/metrics").text, aborted)
    with httpx.stream("POST", f"{url}/v1/completions",
                      json={"model": "lora", "prompt": "Hello", "max_tokens": 100, "stream": True}) as response:
        next(response.iter_lines())
    _wait(lambda: _value(httpx.get(f"{url}/metrics").text, aborted) == before + 1)
    assert _value(httpx.get(f"{url}/metrics").text, "peftkit_running_requests") == 0


def test_load_and_unload_while_serving(real: Live) -> None:
    url, body = real.url, {"model": "again", "prompt": "Hello there", "max_tokens": 40, "temperature": 0}
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": "lora-all"})
    assert loaded.status_code == 200, loaded.text  # a path relative to the adapter root
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as response:
        lines = response.iter_lines()
        pieces = [_piece(next(lines))]  # running now: its adapter cannot go
        _error(httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "again"}), 400, "in use")
        pieces += [_piece(line) for line in lines if line.startswith("data: {")]
    assert "".join(pieces) == real.solo("lora-all", real.engine.prompt_ids("Hello there"), 40)[0]
    # the stream is over: the engine, idle now, tells the store that "again" is free
    _wait(lambda: httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "again"}).status_code == 200)
    _error(httpx.post(f"{url}/v1/completions", json=body), 404, "again")


def _piece(line: str) -> str:
    return json.loads(line.removeprefix("data: "))["choices"][0]["text"]


# --- the bundled models, built as `peftkit serve` builds them -----------------------------------------------------

def test_smollm2_end_to_end() -> None:
    """The real model through `peftkit serve`'s wiring: HTTP answers what the engine answers from Python (the engine
    tests compare SmolLM2 with `generate`)."""
    server = build_server(ServeSettings(model="smollm2", max_batch=4, max_context=256))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    server.start()
    try:
        expected = server.engine.generate(server.engine.chat_ids(messages), None,
                                          SamplingParams(max_tokens=8, temperature=0))
        with live_server(server.app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
            assert [model.id for model in client.models.list()] == ["smollm2"]
            chat = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
    finally:
        server.stop()
    assert (chat.choices[0].message.content, chat.usage.completion_tokens) == (expected.text,
                                                                                expected.completion_tokens)
    assert "Paris" in expected.text


def test_minilm_embeddings() -> None:
    server = build_server(ServeSettings(model="minilm"))
    server.start()
    try:
        texts = ["The match ended in a draw.", "Shares fell sharply on Monday."]
        expected = server.encoder.embed(texts)
        with live_server(server.app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
            packed = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64
            plain = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
            _error(httpx.post(f"{url}/v1/completions", json={"model": "minilm", "prompt": "x"}), 404, "encoder")
    finally:
        server.stop()
    assert [len(item.embedding) for item in packed.data] == [384, 384]
    torch.testing.assert_close(torch.tensor([item.embedding for item in packed.data]), torch.tensor(expected))
    torch.testing.assert_close(torch.tensor(plain.data[0].embedding), torch.tensor(expected[0]))
    assert packed.usage.prompt_tokens == sum(len(ids) for ids in server.encoder.tokenizer(texts)["input_ids"])


def test_minilm_classification(tmp_path: Path) -> None:
    """POST /v1/classify in vLLM's shape, through `peftkit serve`'s wiring: what the encoder answers from Python (the
    encoder tests compare it with the classifier run alone and with `peftkit predict`); the errors each named."""
    save_classifier(tmp_path / "news", LoRA(r=4, targets=["query", "value"]), 5, {"name": "bbc-news", "max_length": 64})
    peftkit.save(peftkit.attach(load_minilm()[0], LoRA(r=2, targets=["query"]), "plain"), tmp_path / "plain", "plain")
    server = build_server(ServeSettings(model="minilm", adapter_root=tmp_path,
                                        adapters={"news": Path("news/adapter"), "plain": Path("plain")}))
    texts = ["The match ended in a draw.", "Shares fell sharply on Monday."]
    server.start()
    try:
        expected = server.encoder.classify(texts, "news")
        with live_server(server.app) as url:
            many = httpx.post(f"{url}/v1/classify", json={"model": "news", "input": texts})
            one = httpx.post(f"{url}/v1/classify", json={"model": "news", "input": texts[1], "user": "u1"})
            errors = [(httpx.post(f"{url}/v1/classify", json=body), *expected) for body, *expected in [
                ({"model": "minilm", "input": "x"}, 400, "no_classifier_head", "base model 'minilm' has no classifier"),
                ({"model": "nope", "input": "x"}, 404, "model_not_found", "no adapter named 'nope'"),
                ({"model": "plain", "input": "x"}, 400, "no_classifier_head", "adapter 'plain' has no classifier head"),
                ({"model": "news"}, 400, "invalid_request_error", "input: Field required"),
                ({"model": "news", "input": []}, 400, "invalid_request_error", "input: Value should have at least 1"),
                ({"model": "news", "input": "x", "top_k": 2}, 400, "invalid_request_error", "top_k: unknown field")]]
    finally:
        server.stop()
    assert many.status_code == one.status_code == 200
    body = many.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"} and body["id"].startswith("classify-")
    assert (body["object"], body["model"]) == ("list", "news")
    assert body["data"] == [{"index": i, "label": result.label, "probs": list(result.probs.values()),
                             "num_classes": 5} for i, result in enumerate(expected)]
    assert list(expected[0].probs) == ["business", "entertainment", "politics", "sports", "tech"]
    tokens = sum(len(ids) for ids in server.encoder.tokenizer(texts)["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
    [alone] = one.json()["data"]  # alone in its batch: no padding, the same numbers to float precision
    assert {**alone, "probs": pytest.approx(body["data"][1]["probs"], abs=1e-6)} == {**body["data"][1], "index": 0}
    for response, status, code, message in errors:
        assert _error(response, status, message)["code"] == code


# --- `peftkit serve`'s command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--pin", "x"], "--pin x: not among the --adapter names"),
    (["--adapter", "chat"], "--adapter takes NAME=DIR, got 'chat'"),
    (["--adapter", "a=x", "--adapter", "a=y"], "--adapter 'a' is given twice"),
    (["--adapter-memory", "5XB"], "--adapter-memory takes a size such as 512MB or 2GiB, got '5XB'"),
    (["--replicas", "2"], "--replicas needs --ray (one process serves one replica)"),
    (["--max-batch", "0"], "max_batch: Input should be greater than or equal to 1"),
])
def test_serve_flags_are_checked_before_loading(argv: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", *argv]) == 2
    assert capsys.readouterr().err == f"peftkit: error: {message}\n"


@pytest.mark.parametrize("text, size", [("4096", 4096), ("512MB", 512_000_000), ("1.5GiB", 3 * 2**29),
                                        ("64 kib", 65536)])
def test_adapter_memory_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size
