"""Learning on real data: MiniLM-L6 + LoRA on BBC News clearly beats chance within seconds."""
from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.train.classify import ClassifyConfig, accuracy, encode, train_classifier


@pytest.fixture(scope="module")
def bbc():
    data = pytest.importorskip("peftkit.data").load_bbc_news(seed=0)
    train = data["train"].shuffle(seed=0).select(range(320))
    test = data["test"].shuffle(seed=0).select(range(200))
    return train, test


def test_lora_on_minilm_learns_bbc_topics(bbc, tmp_path) -> None:
    from peftkit.models import load_minilm

    train, test = bbc
    model, tokenizer = load_minilm(num_labels=5)
    peftkit.attach(model, peftkit.LoRA(r=8, alpha=16, targets=["query", "value"], modules_to_save=["classifier"]))
    config = ClassifyConfig(epochs=2, batch_size=16, lr=3e-3, max_length=64)
    result = train_classifier(model, tokenizer, train["text"], train["label"], test["text"], test["label"],
                              config, progress=False)
    print(f"BBC accuracy before {result.accuracy_before:.3f} after {result.accuracy_after:.3f} in {result.train_seconds:.1f}s")
    assert result.accuracy_before < 0.45  # a fresh head: near chance (0.2)
    assert result.accuracy_after > 0.80
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    # the saved adapter reproduces the trained model's predictions on a fresh base
    peftkit.save(model, tmp_path / "bbc")
    fresh, _ = load_minilm(num_labels=5)
    peftkit.load(fresh, tmp_path / "bbc")
    x = encode(tokenizer, test["text"][:32], 64)
    y = torch.tensor(test["label"][:32])
    model.eval()
    fresh.eval()
    with torch.inference_mode():
        assert torch.equal(model(**x).logits, fresh(**x).logits)
    assert accuracy(fresh, x, y) == accuracy(model, x, y)
