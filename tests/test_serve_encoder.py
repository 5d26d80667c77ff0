"""EncoderEngine on the real MiniLM: concurrent calls for several adapters batched into shared forward passes give
each text's embedding computed alone with its adapter; the base gives the model's own mean-pooled, normalised output."""
from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit import IA3, LoRA
from peftkit.models import load_minilm
from peftkit.serve import AdapterUnavailable, UnknownAdapter
from peftkit.serve.encoder import EncoderEngine
from peftkit.serve.store import AdapterStore

from .conftest import randomize

TEXTS = ["A man is eating food.", "The new movie is awesome", "Two dogs play in the snow, far from home.",
         "Stocks fell sharply on Monday", "hi", "A cat sits on the mat while the rain keeps falling outside."]
ADAPTERS = {"lora1": LoRA(r=4, targets=["query", "value"]), "lora2": LoRA(r=8, alpha=4, targets=["query", "value"]),
            "lora3": LoRA(r=2, targets=["query", "value", "dense"]), "lora4": LoRA(r=6, targets=["key", "value"]),
            "ia3": IA3(targets=["key", "value", "output.dense"], feedforward=["output.dense"])}


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def _alone(model, tokenizer, text: str, adapter: str | None) -> torch.Tensor:
    """The formula on one text run alone: normalize(mean of last_hidden_state over its tokens)."""
    inputs = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        if adapter is None:
            with peftkit.disabled(model) if peftkit.adapters(model) else nullcontext():
                hidden = model(**inputs).last_hidden_state
        else:
            peftkit.activate(model, adapter)
            hidden = model(**inputs).last_hidden_state
    return F.normalize(hidden[0].mean(0), dim=0)


@pytest.fixture
def served(minilm, tmp_path: Path):
    """An engine over MiniLM with ADAPTERS saved to tmp_path and registered (not loaded); the model is left bare."""
    model, tokenizer = minilm
    for name, config in ADAPTERS.items():
        peftkit.attach(model, config, name)
        randomize(model, name, scale=0.1)
        peftkit.save(model, tmp_path / name, name)
        peftkit.remove(model, name)
    store = AdapterStore(model, tmp_path)
    for name in ADAPTERS:
        store.register(name, name)
    engine = EncoderEngine(model, tokenizer, store, max_batch=16)
    engine.start()
    yield engine
    engine.stop()
    store.close()
    for name in list(peftkit.adapters(model)):
        peftkit.remove(model, name)


def test_base_is_the_models_mean_pooled_output(minilm) -> None:
    model, tokenizer = minilm
    engine = EncoderEngine(model, tokenizer)
    engine.start()
    try:
        vectors = torch.tensor(engine.embed(TEXTS, None))
        with pytest.raises(UnknownAdapter, match="serves the base only"):
            engine.embed(["x"], "lora1")
    finally:
        engine.stop()
    expected = torch.stack([_alone(model, tokenizer, text, None) for text in TEXTS])
    torch.testing.assert_close(vectors, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(len(TEXTS)))


def test_concurrent_mixed_adapter_calls_equal_each_text_alone(served) -> None:
    engine = served
    batches: list[list[str | None]] = []
    gate, first = threading.Event(), threading.Event()
    embed_rows = engine._embed_rows

    def gated(texts, row_adapters):  # hold the first batch so every other call queues behind it
        first.set()
        assert gate.wait(30)
        batches.append(list(row_adapters))
        return embed_rows(texts, row_adapters)

    engine._embed_rows = gated
    names = [None, *ADAPTERS]
    jobs = [(TEXTS[i % len(TEXTS):] + TEXTS[:i % len(TEXTS)], names[i % len(names)]) for i in range(12)]
    results: dict[int, list[list[float]]] = {}

    def call(i: int) -> None:
        results[i] = engine.embed(*jobs[i])

    threads = [threading.Thread(target=call, args=(0,))]
    threads[0].start()
    assert first.wait(30)
    threads += [threading.Thread(target=call, args=(i,)) for i in range(1, len(jobs))]
    for thread in threads[1:]:
        thread.start()
    while engine._calls.qsize() < len(jobs) - 1:  # all queued behind the held batch
        threading.Event().wait(0.01)
    gate.set()
    for thread in threads:
        thread.join(60)
    assert len(results) == len(jobs)
    assert max(len(set(batch)) for batch in batches) >= 4 and max(len(batch) for batch in batches) == 16
    model, tokenizer = engine.model, engine.tokenizer
    for i, (texts, adapter) in enumerate(jobs):
        expected = torch.stack([_alone(model, tokenizer, text, adapter) for text in texts])
        torch.testing.assert_close(torch.tensor(results[i]), expected, rtol=1e-5, atol=1e-5)
    base = torch.stack([_alone(model, tokenizer, text, None) for text in TEXTS[:2]])
    assert all(not torch.allclose(torch.tensor(results[i][:2]), base, atol=1e-3) for i in range(1, len(ADAPTERS) + 1)
               if jobs[i][0][:2] == TEXTS[:2])


def test_unknown_and_failed_adapters(served, tmp_path) -> None:
    engine = served
    with pytest.raises(UnknownAdapter, match="no adapter named 'nope'"):
        engine.embed(["x"], "nope")
    (tmp_path / "lora2" / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterUnavailable, match="not a readable safetensors"):
        engine.embed(["x"], "lora2")
    with pytest.raises(AdapterUnavailable, match="not a readable safetensors"):
        engine.embed(["x"], "lora2")  # refused at once now
    assert len(engine.embed(TEXTS, "lora1")) == len(TEXTS)  # the others keep serving
