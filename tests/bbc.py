"""Shared learning check: fine-tune MiniLM-L6 with one adapter config on a BBC News subset."""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import pytest
from torch import nn

import peftkit
from peftkit.train.classify import ClassifyConfig, ClassifyResult, train_classifier

TRAIN_ROWS, TEST_ROWS = 320, 200
MAX_LENGTH = 32  # tokens per article: the headline and the first sentence
BEATS_HEAD_ALONE = 0.75  # accuracy a method must pass: the classifier head alone reaches 0.71 (lr 1e-2, 32 tokens)


@lru_cache(maxsize=1)
def bbc_subset():
    data = pytest.importorskip("peftkit.data").load_bbc_news(seed=0)
    return data["train"].shuffle(seed=0).select(range(TRAIN_ROWS)), data["test"].shuffle(seed=0).select(range(TEST_ROWS))


def fit_bbc(config: peftkit.AdapterConfig, lr: float = 3e-3, epochs: int = 2,
            on_attach: Callable[[nn.Module], dict[str, Any]] | None = None, max_length: int = MAX_LENGTH,
            ) -> tuple[ClassifyResult, nn.Module, object]:
    """Attach `config` (plus a trainable classifier head) to a fresh MiniLM and train briefly.

    `on_attach(model)` may return extra `train_classifier` arguments (`on_step`, `regularizer`).
    `max_length` is the tokens per article, in training and in the accuracy checks.

    Returns (result, model, tokenizer); the result holds accuracy before/after and the losses.
    """
    from peftkit.models import load_minilm

    train, test = bbc_subset()
    model, tokenizer = load_minilm(num_labels=5)
    if "classifier" not in config.modules_to_save:
        config = config.model_copy(update={"modules_to_save": [*config.modules_to_save, "classifier"]})
    peftkit.attach(model, config)
    hooks = on_attach(model) if on_attach is not None else {}
    result = train_classifier(model, tokenizer, train["text"], train["label"], test["text"], test["label"],
                              ClassifyConfig(epochs=epochs, batch_size=16, lr=lr, max_length=max_length), progress=False, **hooks)
    print(f"{config.method}: BBC accuracy {result.accuracy_before:.3f} -> {result.accuracy_after:.3f} "
          f"in {result.train_seconds:.1f}s")
    return result, model, tokenizer
