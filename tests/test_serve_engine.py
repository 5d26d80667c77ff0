"""The serving engine: continuous batching across adapters of every kind gives each request exactly what it gets
alone; stop strings, EOS, cancellation, sampling seeds, refusals, and the cache's row bookkeeping."""
from __future__ import annotations

import asyncio

import pytest
import torch

import peftkit
from peftkit.serve import (ContextTooLong, Engine, FinishEvent, GenerationRequest, QueueFull, SamplingParams,
                           TokenEvent, UnknownAdapter)
from tests.serve_checks import METHODS, ReadyStore, smollm2_tokenizer, solo, tiny_llama, with_adapters

PROMPTS = ["Hello there, how are you?", "What is the capital of France? Tell me in detail please.", "x",
           "A long story " * 12]


@pytest.fixture(scope="module")
def model():
    return with_adapters(tiny_llama())


def greedy(max_tokens: int, **fields) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **fields)


def run(engine: Engine, requests: list[GenerationRequest]) -> list[list]:
    """Submit all, collect every request's events, stop the engine (it owns the model until then)."""
    engine.start()
    try:
        handles = [engine.submit(request) for request in requests]
        return [list(handle) for handle in handles]
    finally:
        engine.stop()


def test_mixed_adapters_in_one_running_batch_equal_each_request_alone(model):
    """24 requests over the base and six adapters (LoRA of two ranks, (IA)3, prefix, prompt, bottleneck), more
    than the batch holds and with prompts longer than the prefill budget: rows join and leave at every step."""
    tokenizer = smollm2_tokenizer()
    engine = Engine(model, tokenizer, ReadyStore(model), max_batch=6, prefill_budget=16)
    adapters = [None, *METHODS]
    requests = [GenerationRequest(engine.prompt_ids(PROMPTS[i % 4]), adapters[i % len(adapters)],
                                  greedy(2 + (i * 7) % 19)) for i in range(24)]
    results = run(engine, requests)
    assert engine.stats() == {"waiting": 0, "running": 0, "tokens_generated": sum(
        r[-1].completion_tokens for r in results)}
    for request, events in zip(requests, results):
        finish = events[-1]
        expected = solo(model, request.prompt_ids, request.adapter, request.params.max_tokens)
        assert finish.tokens == expected, (request, finish)
        assert finish.text == "".join(e.text for e in events[:-1]) == tokenizer.decode(expected,
                                                                                        skip_special_tokens=True)
        assert (finish.reason, finish.completion_tokens) == ("length", len(expected))
        assert finish.prompt_tokens == len(request.prompt_ids)


def test_adapters_change_outputs(model):
    """The equality above means something: the adapters' answers differ from the base's and from each other."""
    ids = smollm2_tokenizer()("Hello there")["input_ids"]
    answers = {name: tuple(solo(model, ids, name, 8)) for name in [None, *METHODS]}
    assert len(set(answers.values())) == len(answers)


def test_stop_string_ends_the_output_without_it(model):
    tokenizer = smollm2_tokenizer()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    full = tokenizer.decode(solo(model, ids, "lora", 12), skip_special_tokens=True)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    engine = Engine(model, tokenizer, ReadyStore(model))
    events = run(engine, [GenerationRequest(ids, "lora", greedy(12, stop=["never appears", stop]))])[0]
    finish = events[-1]
    assert finish.reason == "stop"
    assert finish.text == full[:full.index(stop)]
    assert "".join(e.text for e in events[:-1]) == finish.text  # nothing of the stop string was streamed


def test_eos_finishes_with_stop(model):
    """With the 4th greedy token declared EOS, the output is the first three tokens, reason 'stop'; with the first
    declared EOS, nothing."""
    tokenizer = smollm2_tokenizer()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    tokens = solo(model, ids, "ia3", 8)
    config = model.generation_config
    saved = config.eos_token_id
    try:
        for cut in (3, 0):
            assert tokens[cut] not in tokens[:cut]
            config.eos_token_id = tokens[cut]
            finish = run(Engine(model, tokenizer, ReadyStore(model)), [GenerationRequest(ids, "ia3", greedy(8))])[0][-1]
            assert (finish.reason, finish.completion_tokens) == ("stop", cut)
            assert finish.text == tokenizer.decode(tokens[:cut])
    finally:
        config.eos_token_id = saved


def test_cancel_frees_the_row_and_others_finish(model):
    tokenizer = smollm2_tokenizer()
    engine = Engine(model, tokenizer, ReadyStore(model), max_batch=2).start()
    try:
        long = engine.submit(GenerationRequest(tokenizer(PROMPTS[1])["input_ids"], "prefix", greedy(400)))
        next(iter(long))  # it runs
        others = [engine.submit(GenerationRequest(tokenizer(p)["input_ids"], "ia3", greedy(6))) for p in PROMPTS]
        long.cancel()
        assert list(long)[-1].reason == "abort"
        finished = [list(h)[-1] for h in others]
    finally:
        engine.stop()
    assert [f.reason for f in finished] == ["length"] * 4
    assert engine.stats()["running"] == 0
    for prompt, finish in zip(PROMPTS, finished):  # the rows moved into the cancelled one's place stay correct
        assert finish.text == tokenizer.decode(solo(model, tokenizer(prompt)["input_ids"], "ia3", 6))


def test_seeded_sampling_does_not_depend_on_batch_neighbours(model):
    tokenizer = smollm2_tokenizer()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    alone = run(Engine(model, tokenizer, ReadyStore(model)), [GenerationRequest(ids, "lora", sampled)])[0][-1]
    crowd = [GenerationRequest(tokenizer(p)["input_ids"], a, SamplingParams(max_tokens=10, temperature=1.0))
             for p, a in zip(PROMPTS, ["ia3", None, "prompt", "lora"])]
    together = run(Engine(model, tokenizer, ReadyStore(model)), [*crowd, GenerationRequest(ids, "lora", sampled)])
    assert together[-1][-1].text == alone.text
    greedy_text = tokenizer.decode(solo(model, ids, "lora", 10))
    assert alone.text != greedy_text  # it did sample


def test_async_stream(model):
    tokenizer = smollm2_tokenizer()
    engine = Engine(model, tokenizer, ReadyStore(model)).start()

    async def collect() -> list:
        handle = engine.submit(GenerationRequest(tokenizer(PROMPTS[0])["input_ids"], "bottleneck", greedy(7)))
        return [event async for event in handle.stream()]

    try:
        events = asyncio.run(collect())
    finally:
        engine.stop()
    assert isinstance(events[-1], FinishEvent) and all(isinstance(e, TokenEvent) for e in events[:-1])
    assert events[-1].text == tokenizer.decode(solo(model, tokenizer(PROMPTS[0])["input_ids"], "bottleneck", 7))


def test_refusals(model):
    tokenizer = smollm2_tokenizer()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    engine = Engine(model, tokenizer, ReadyStore(model), max_queue=2)  # not started: the queue fills up
    with pytest.raises(UnknownAdapter, match="'nope'"):
        engine.submit(GenerationRequest(ids, "nope", greedy(4)))
    with pytest.raises(UnknownAdapter, match="none"):
        Engine(model, tokenizer).submit(GenerationRequest(ids, "lora", greedy(4)))
    with pytest.raises(ContextTooLong, match="512"):
        engine.submit(GenerationRequest(ids, None, greedy(510)))
    with pytest.raises(ContextTooLong, match="empty"):
        engine.submit(GenerationRequest([], None, greedy(4)))
    engine.submit(GenerationRequest(ids, None, greedy(4)))
    engine.submit(GenerationRequest(ids, None, greedy(4)))
    with pytest.raises(QueueFull, match="2 waiting"):
        engine.submit(GenerationRequest(ids, None, greedy(4)))
    assert QueueFull.status == 429 and UnknownAdapter.status == 404 and ContextTooLong.status == 400


def test_virtual_tokens_count_against_the_context(model):
    """A prompt that fits alone but not after the prefix adapter's 5 virtual tokens ends with an error event."""
    tokenizer = smollm2_tokenizer()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    events = run(Engine(model, tokenizer, ReadyStore(model)),
                 [GenerationRequest(ids, "prefix", greedy(512 - len(ids)))])[0]
    assert events[-1].reason == "error" and "5 virtual tokens" in events[-1].error


def test_chat_template_and_smollm2_answers_like_generate():
    """The real SmolLM2 with a chat prompt: the engine's greedy answer is `generate`'s, for the base and a LoRA."""
    model, tokenizer = peftkit.models.load_smollm2()
    with_adapters(model.eval(), ["lora"])
    engine = Engine(model, tokenizer, ReadyStore(model))
    ids = engine.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    assert ids == tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)
    results = run(engine, [GenerationRequest(ids, None, greedy(10)), GenerationRequest(ids, "lora", greedy(10))])
    for adapter, events in zip([None, "lora"], results):
        assert events[-1].text == tokenizer.decode(solo(model, ids, adapter, 10), skip_special_tokens=True)
    assert "Paris" in results[0][-1].text
