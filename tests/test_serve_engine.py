"""The serving engine: continuous batching across adapters of every kind gives each request exactly what it gets
alone; stop strings, EOS, cancellation, sampling seeds, refusals, and the cache's row bookkeeping."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

import peftkit
from peftkit.serve import (AdapterStore, ContextTooLong, Engine, EngineStopped, FinishEvent, GenerationRequest,
                           QueueFull, SamplingParams, ServeError, TokenEvent, UnknownAdapter)
from peftkit.serve.engine import IDLE_TICK
from peftkit.serve.sampling import TextStream, next_token
from tests.serve_checks import METHODS, LoadingStore, ReadyStore, smollm2_tokenizer, solo, tiny_llama, with_adapters

PROMPTS = ["Hello there, how are you?", "What is the capital of France? Tell me in detail please.", "x",
           "A long story " * 12]


ADAPTERS = [*METHODS, "lora-2", "lora-3"]  # four LoRA adapters on q_proj / v_proj: the batched LoRA bank path


@pytest.fixture(scope="module")
def model():
    return with_adapters(tiny_llama(), ADAPTERS)


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


@pytest.mark.parametrize("budget", [16, 96])
def test_mixed_adapters_in_one_running_batch_equal_each_request_alone(model, budget):
    """27 requests over the base and eight adapters (LoRA of two ranks, (IA)3, prefix, prompt, bottleneck), more
    than the batch holds: rows join and leave at every step. Budget 16: prompts longer than it are prefilled in
    chunks; 96: several newcomers' prompts (padded, prompt adapters' virtual tokens in front) share one forward."""
    tokenizer = smollm2_tokenizer()
    engine = Engine(model, tokenizer, ReadyStore(model), max_batch=8, prefill_budget=budget)
    adapters = [None, *ADAPTERS]
    requests = [GenerationRequest(engine.prompt_ids(PROMPTS[i % 4]), adapters[i % len(adapters)],
                                  greedy(2 + (i * 7) % 19)) for i in range(27)]
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
    answers = {name: tuple(solo(model, ids, name, 8)) for name in [None, *ADAPTERS]}
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
    engine = Engine(model, tokenizer, LoadingStore(model), max_queue=2).start()  # its adapters never load
    try:
        with pytest.raises(UnknownAdapter, match="'nope'"):
            engine.submit(GenerationRequest(ids, "nope", greedy(4)))
        with pytest.raises(UnknownAdapter, match="none"):
            Engine(model, tokenizer).submit(GenerationRequest(ids, "lora", greedy(4)))
        with pytest.raises(ContextTooLong, match="512"):
            engine.submit(GenerationRequest(ids, None, greedy(510)))
        with pytest.raises(ServeError, match="empty"):
            engine.submit(GenerationRequest([], None, greedy(4)))
        waiting = [engine.submit(GenerationRequest(ids, "lora", greedy(4))) for _ in range(2)]
        with pytest.raises(QueueFull, match="2 waiting"):
            engine.submit(GenerationRequest(ids, None, greedy(4)))
    finally:
        engine.stop()
    assert [list(h)[-1].reason for h in waiting] == ["abort", "abort"]
    assert QueueFull.status == 429 and UnknownAdapter.status == 404 and ContextTooLong.status == 400


def test_virtual_tokens_count_against_the_context(model):
    """A prompt that fits alone but not after the prefix adapter's 5 virtual tokens is refused when it arrives."""
    tokenizer = smollm2_tokenizer()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    engine = Engine(model, tokenizer, ReadyStore(model))
    assert engine.room("prefix", len(ids)) == engine.room(None, len(ids)) - 5 == 512 - len(ids) - 5
    with pytest.raises(ContextTooLong, match="5 virtual tokens"):
        engine.submit(GenerationRequest(ids, "prefix", greedy(512 - len(ids))))


def test_stopped_engine_refuses_and_shutdown_ends_every_request(model):
    tokenizer = smollm2_tokenizer()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    engine = Engine(model, tokenizer, ReadyStore(model))
    with pytest.raises(EngineStopped):
        engine.submit(GenerationRequest(ids, None, greedy(4)))
    engine.start()
    handles = [engine.submit(GenerationRequest(ids, "lora", greedy(300))) for _ in range(3)]
    engine.stop()
    assert [list(h)[-1].reason for h in handles] == ["abort"] * 3
    with pytest.raises(EngineStopped):
        engine.submit(GenerationRequest(ids, None, greedy(4)))


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


def test_adapters_load_evict_and_unload_while_requests_run(model, tmp_path):
    """More adapters than the store may hold (3 loaded at most), loaded on first use in the background and evicted
    while other requests decode, one registered and one unregistered mid-run: every answer equals its solo run."""
    tokenizer = smollm2_tokenizer()
    names = [f"{method}-{i}" for i in range(2) for method in ("lora", "ia3", "prefix", "bottleneck")]
    source = with_adapters(tiny_llama(), names)
    for name in names:
        peftkit.save(source, tmp_path / name, name=name)
    base = tiny_llama()  # the same base weights (same seed), no adapters yet
    store = AdapterStore(base, root=tmp_path, max_loaded=3)
    for name in names[:-1]:
        store.register(name, tmp_path / name)
    engine = Engine(base, tokenizer, store, max_batch=4, prefill_budget=32).start()
    try:
        requests = [GenerationRequest(tokenizer(PROMPTS[i % 4])["input_ids"], names[i % 7], greedy(3 + i % 5))
                    for i in range(21)]
        handles = [engine.submit(r) for r in requests]
        store.register(names[-1], tmp_path / names[-1])
        late = GenerationRequest(tokenizer(PROMPTS[0])["input_ids"], names[-1], greedy(6))
        handles.append(engine.submit(late))
        requests.append(late)
        results = [list(h)[-1] for h in handles]
        store.unregister(names[0])
        with pytest.raises(UnknownAdapter):
            engine.submit(GenerationRequest(requests[0].prompt_ids, names[0], greedy(2)))
    finally:
        engine.stop()
        store.close()
    assert store.stats()["evictions"] > 0 and len(peftkit.adapters(base)) <= 3
    for request, finish in zip(requests, results):
        assert finish.tokens == solo(source, request.prompt_ids, request.adapter, request.params.max_tokens), request


class SlowPrepare(AdapterStore):
    """A store whose between-iterations bookkeeping lags (as on a loaded machine): 0.2 s before each `prepare`."""

    def prepare(self, wanted, in_use) -> None:
        time.sleep(0.2)
        super().prepare(wanted, in_use)


def test_an_adapter_can_be_unregistered_as_soon_as_its_last_request_finishes(tmp_path):
    """The engine tells the store a row is gone before its client gets the final event, not at the next iteration
    (the full suite on a busy machine once unregistered in between: 'in use by running or queued requests')."""
    source = with_adapters(tiny_llama(), ["lora"])
    peftkit.save(source, tmp_path / "lora", name="lora")
    base = tiny_llama()
    store = SlowPrepare(base, root=tmp_path)
    store.register("lora", tmp_path / "lora")
    tokenizer = smollm2_tokenizer()
    engine = Engine(base, tokenizer, store).start()
    try:
        list(engine.submit(GenerationRequest(tokenizer(PROMPTS[0])["input_ids"], "lora", greedy(2))))
        store.unregister("lora")
    finally:
        engine.stop()
        store.close()
    assert "lora" not in store.names()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Adapters saved to disk, the model they were made on, and a fresh copy of its base (same seed)."""
    root = tmp_path_factory.mktemp("adapters")
    source = with_adapters(tiny_llama(), ["lora", "ia3", "prefix"])
    for name in ("lora", "ia3", "prefix"):
        peftkit.save(source, root / name, name=name)
    return root, source


def test_an_adapter_that_cannot_attach_fails_alone(saved, monkeypatch):
    """An attach that raises something other than a misfit (out of memory) fails that adapter's requests only; the
    engine keeps serving, also after going idle."""
    root, source = saved
    import peftkit.serve.store as store_module

    def attach(model, config, name, activate):
        if name == "ia3":
            raise torch.OutOfMemoryError("no memory for this adapter")
        return peftkit.attach(model, config, name=name, activate=activate)

    monkeypatch.setattr(store_module, "attach", attach)
    tokenizer = smollm2_tokenizer()
    store = AdapterStore(tiny_llama(), root=root)
    for name in ("lora", "ia3"):
        store.register(name, name)
    engine = Engine(store.model, tokenizer, store).start()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    try:
        bad, good = (engine.submit(GenerationRequest(ids, name, greedy(4))) for name in ("ia3", "lora"))
        assert list(bad)[-1].error.endswith("OutOfMemoryError: no memory for this adapter")
        assert list(good)[-1].tokens == solo(source, ids, "lora", 4)
        time.sleep(2 * IDLE_TICK)  # idle ticks run the store again
        assert engine.generate(ids, "lora", greedy(4)).tokens == solo(source, ids, "lora", 4)
    finally:
        engine.stop()
        store.close()


def test_unload_then_load_under_the_same_name(saved):
    """vLLM's update flow: unload an adapter, load another under its name, while the server is idle."""
    root, source = saved
    tokenizer = smollm2_tokenizer()
    store = AdapterStore(tiny_llama(), root=root)
    store.register("current", "lora")
    engine = Engine(store.model, tokenizer, store).start()
    ids = tokenizer(PROMPTS[1])["input_ids"]
    try:
        assert engine.generate(ids, "current", greedy(5)).tokens == solo(source, ids, "lora", 5)
        time.sleep(2 * IDLE_TICK)  # the idle engine tells the store nothing is in use
        store.unregister("current")
        store.register("current", "prefix")
        assert engine.generate(ids, "current", greedy(5)).tokens == solo(source, ids, "prefix", 5)
        assert engine.room("current", len(ids)) == 512 - len(ids) - 5  # the new adapter's virtual tokens count
    finally:
        engine.stop()
        store.close()


def test_top_p_zero_keeps_the_most_likely_token():
    logits = torch.tensor([0.5, 2.0, 1.0, -1.0])
    params = SamplingParams(temperature=1.0, top_p=0.0)
    generator = torch.Generator().manual_seed(0)
    assert {next_token(logits, params, generator) for _ in range(20)} == {1}


@pytest.mark.parametrize("stop", [[], ["über", "🙂 x"]])
def test_text_stream_pieces_add_up_to_the_whole_decode(stop):
    """Incremental detokenizing (a window of the latest tokens) releases exactly what decoding every token at once
    gives: spaces, accented letters, and emoji split across byte tokens included; cut at the first stop string."""
    tokenizer = smollm2_tokenizer()
    text = "Grüße aus München 🙂 x — naïve café, 日本語 über alles.\n  Two  spaces and   three. " * 3
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream, pieces, stopped = TextStream(tokenizer, stop), [], False
    for token in ids:
        piece, stopped = stream.add(token)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(stream.finish())
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [whole.find(s) for s in stop if s in whole]
    assert "".join(pieces) == (whole[:min(cuts)] if cuts else whole)
    assert stopped == bool(cuts)
    assert all("\ufffd" not in piece for piece in pieces)
