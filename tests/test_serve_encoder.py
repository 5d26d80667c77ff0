"""EncoderEngine on the real MiniLM: concurrent calls for several adapters batched into shared forward passes give
each text's embedding computed alone with its adapter; the base gives the model's own mean-pooled, normalised output;
classification adapters saved from MiniLM's sequence classifier give, in mixed batches, each text's probabilities
from its own head as the classifier computes them alone, and `peftkit predict`'s labels."""
from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import peftkit
from peftkit import IA3, LoRA
from peftkit.data import load_bbc_news
from peftkit.models import load_minilm
from peftkit.serve import AdapterUnavailable, UnknownAdapter
from peftkit.serve import encoder as encoder_module
from peftkit.serve.encoder import EncoderEngine, NoClassifierHead, read_encoder_adapter
from peftkit.serve.store import AdapterStore
from peftkit.train import load_config
from peftkit.train.saved import predict_saved

from .conftest import randomize
from .serve_http_checks import save_classifier

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


def _batched_behind_one(engine: EncoderEngine, calls: list[Callable[[], list]]) -> tuple[list[list], list[list]]:
    """Run `calls` in threads, the first one's batch held until all the others are queued so they batch together;
    (each call's result, each batch's row adapters)."""
    batches: list[list[str | None]] = []
    gate, first = threading.Event(), threading.Event()
    encode_rows = engine._encode_rows

    def gated(texts, row_adapters, limits):
        first.set()
        assert gate.wait(30)
        batches.append(list(row_adapters))
        return encode_rows(texts, row_adapters, limits)

    engine._encode_rows = gated
    results: dict[int, list] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, calls[i]())) for i in range(len(calls))]
    threads[0].start()
    assert first.wait(60)
    for thread in threads[1:]:
        thread.start()
    while engine._calls.qsize() < len(calls) - 1:  # all queued behind the held batch
        threading.Event().wait(0.01)
    gate.set()
    for thread in threads:
        thread.join(60)
    assert len(results) == len(calls)
    return [results[i] for i in range(len(calls))], batches


def test_concurrent_mixed_adapter_calls_equal_each_text_alone(served) -> None:
    engine = served
    names = [None, *ADAPTERS]
    jobs = [(TEXTS[i % len(TEXTS):] + TEXTS[:i % len(TEXTS)], names[i % len(names)]) for i in range(12)]
    results, batches = _batched_behind_one(engine, [lambda job=job: engine.embed(*job) for job in jobs])
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


# --- classification: adapters saved from MiniLM's sequence classifier, each row through its own adapter's head -----

BBC = {"name": "bbc-news", "max_length": 64}  # the run's data: the bundled set's 5 topics; texts cut at 64 tokens
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory):
    """A root holding `news` (LoRA, 5 BBC topics, with its run config), `tone` (another LoRA on every dense layer
    and the pooler, 3 classes, no run config) and `plain` (an embedding adapter without a head); the references."""
    root = tmp_path_factory.mktemp("classifiers")
    references = {"news": save_classifier(root / "news", LoRA(r=4, targets=["query", "value"]), 5, BBC),
                  "tone": save_classifier(root / "tone", LoRA(r=2, targets=["query", "dense"]), 3)}
    model, tokenizer = load_minilm()
    peftkit.attach(model, LoRA(r=4, targets=["query", "value"]), "plain")
    randomize(model, "plain", scale=0.1)
    peftkit.save(model, root / "plain", "plain")
    peftkit.remove(model, "plain")
    return root, references, (model, tokenizer)


@pytest.fixture
def classifying(classifiers):
    """An engine over the bare MiniLM whose store reads classification adapters (`read_encoder_adapter`)."""
    root, references, (model, tokenizer) = classifiers
    store = AdapterStore(model, root, reader=read_encoder_adapter)
    for name, path in (("news", "news/adapter"), ("tone", "tone/adapter"), ("plain", "plain")):
        store.register(name, path)
    engine = EncoderEngine(model, tokenizer, store, max_batch=16)
    engine.start()
    yield engine, references, root
    engine.stop()
    store.close()
    for name in list(peftkit.adapters(model)):
        peftkit.remove(model, name)


def _classified_alone(reference, tokenizer, text: str, max_length: int) -> torch.Tensor:
    """The classifier's softmax on one text run alone (BertForSequenceClassification with the adapter loaded)."""
    with torch.no_grad():
        inputs = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
        return reference(**inputs).logits[0].softmax(-1)


def test_mixed_classify_and_embed_calls_equal_each_text_alone(classifying) -> None:
    engine, references, _ = classifying
    for adapter in ("news", "tone"):  # loaded before the batches are formed, so the queued rows can mix
        engine.classify(["x"], adapter)
    news_text = "Shares in the bank fell 5% after profits missed forecasts. " * 20  # past the run's 64 tokens
    texts = [*TEXTS, news_text]
    jobs = [("classify", texts, "news"), ("classify", texts[::-1], "tone"), ("embed", TEXTS, "news"),
            ("classify", texts[2:], "tone"), ("classify", texts[:3], "news")]
    results, batches = _batched_behind_one(
        engine, [lambda job=job: getattr(engine, job[0])(*job[1:]) for job in jobs])
    assert max(len(set(batch)) for batch in batches) == 2 and max(len(batch) for batch in batches) == 16
    tokenizer = engine.tokenizer
    for i, (kind, job_texts, adapter) in enumerate(jobs):
        reference = references[adapter]
        if kind == "embed":  # the classifier's encoder is the served one with the adapter: same embeddings
            expected = torch.stack([_alone(reference.bert, tokenizer, text, None) for text in job_texts])
            torch.testing.assert_close(torch.tensor(results[i]), expected, rtol=1e-5, atol=1e-5)
            continue
        max_length = BBC["max_length"] if adapter == "news" else engine.max_length
        expected = torch.stack([_classified_alone(reference, tokenizer, text, max_length) for text in job_texts])
        got = torch.tensor([list(result.probs.values()) for result in results[i]])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        labels = BBC_TOPICS if adapter == "news" else ("LABEL_0", "LABEL_1", "LABEL_2")
        assert all(tuple(result.probs) == labels for result in results[i])
        assert [result.label for result in results[i]] == [labels[k] for k in expected.argmax(-1).tolist()]
        lengths = [len(ids) for ids in tokenizer(job_texts, truncation=True, max_length=max_length)["input_ids"]]
        assert [result.tokens for result in results[i]] == lengths
    assert results[0][-1].tokens == BBC["max_length"]  # the long text was cut where training cut it
    first_two = [list(result.probs.values()) for result in results[0][:2]]
    assert not torch.allclose(torch.tensor(first_two[0]), torch.tensor(first_two[1]), atol=1e-3)  # texts matter


def test_classify_equals_peftkit_predict(classifying, tmp_path: Path) -> None:
    """The server's labels and probabilities are `peftkit predict`'s for the same adapter, on BBC test articles."""
    engine, _, root = classifying
    articles = load_bbc_news(seed=0)["test"]["text"][:8]
    inputs = tmp_path / "articles.jsonl"
    inputs.write_text("".join(json.dumps({"text": text}) + "\n" for text in articles), encoding="utf-8")
    predicted = predict_saved(load_config(root / "news" / "config.yaml"), root / "news" / "adapter", inputs)
    served = engine.classify(articles, "news")
    assert [result.label for result in served] == [record["label"] for record in predicted]
    for result, record in zip(served, predicted):
        assert result.probs == pytest.approx(record["probabilities"], abs=2e-6)  # predict rounds to 6 digits


def test_classify_errors(classifying, tmp_path: Path) -> None:
    engine, _, root = classifying
    with pytest.raises(NoClassifierHead, match="the base model 'minilm' has no classifier head"):
        engine.classify(["x"], None)
    with pytest.raises(UnknownAdapter, match="no adapter named 'nope'"):
        engine.classify(["x"], "nope")
    with pytest.raises(NoClassifierHead, match="adapter 'plain' has no classifier head"):
        engine.classify(["x"], "plain")
    assert len(engine.embed(["x"], "plain")[0]) == 384  # it still embeds
    mismatch = root / "mismatch"  # tone's 3-class head beside a run config that gives BBC's 5 topics
    shutil.copytree(root / "tone" / "adapter", mismatch / "adapter")
    shutil.copy(root / "news" / "config.yaml", mismatch / "config.yaml")
    engine.store.register("mismatch", "mismatch/adapter")
    with pytest.raises(AdapterUnavailable, match="gives 5 label names .* but the adapter's head has 3 classes"):
        engine.classify(["x"], "mismatch")
    assert engine.classify(["x"], "tone")[0].label.startswith("LABEL_")  # the others keep serving


@pytest.mark.parametrize("data, labels", [
    ({"train": "gone.csv", "labels": ["calm", "angry", "sad"]}, ("calm", "angry", "sad")),  # declared: nothing read
    ({"train": "gone.csv"}, ("LABEL_0", "LABEL_1", "LABEL_2")),  # local files are never read by the server
])
def test_label_names_from_the_run_config(classifying, data: dict, labels: tuple[str, ...]) -> None:
    engine, _, root = classifying
    run = root / f"run-{len(data)}"
    shutil.copytree(root / "tone" / "adapter", run / "adapter", dirs_exist_ok=True)
    config = yaml.safe_load((root / "news" / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "data": data}), encoding="utf-8")
    engine.store.register("run", run.relative_to(root) / "adapter")
    [result] = engine.classify(["x"], "run")
    assert tuple(result.probs) == labels and result.label in labels
    tone = engine.classify(["x"], "tone")[0]  # the same head under its numbered names
    assert list(result.probs.values()) == pytest.approx(list(tone.probs.values()), abs=1e-6)


def test_a_run_config_outside_the_adapter_root_is_not_read(classifiers) -> None:
    """Rooted at the adapter directory itself, the run config beside it lies outside the root: numbered labels."""
    root, _, (model, _) = classifiers
    adapter = (root / "news" / "adapter").resolve()
    rooted = partial(read_encoder_adapter, root=adapter)
    config, _, _ = rooted(adapter, model)
    assert encoder_module._HEADS[id(config)].labels == tuple(f"LABEL_{i}" for i in range(5))
    config, _, _ = partial(read_encoder_adapter, root=root)(adapter, model)  # inside the root: the run's topics
    assert encoder_module._HEADS[id(config)].labels == BBC_TOPICS


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft's own noise
def test_a_classifier_saved_by_peft(minilm, tmp_path: Path) -> None:
    """Hugging Face `peft`'s sequence-classifier adapter (its head in modules_to_save) classifies as PEFT's model."""
    from peft import LoraConfig, get_peft_model

    classifier, tokenizer = load_minilm(num_labels=4)
    lora = LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], init_lora_weights=False)
    reference = get_peft_model(classifier, lora).eval()
    reference.save_pretrained(tmp_path / "adapter")
    model, _ = minilm
    store = AdapterStore(model, tmp_path, reader=read_encoder_adapter)
    store.register("peft", "adapter")
    engine = EncoderEngine(model, tokenizer, store)
    engine.start()
    try:
        results = engine.classify(TEXTS, "peft")
    finally:
        engine.stop()
        store.close()
        peftkit.remove(model, "peft")
    with torch.no_grad():
        expected = reference(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1)
    torch.testing.assert_close(torch.tensor([list(result.probs.values()) for result in results]), expected,
                               rtol=1e-5, atol=1e-5)
    assert all(tuple(result.probs) == ("LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3") for result in results)
