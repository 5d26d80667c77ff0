"""Shared learning check: fine-tune MiniLM-L6 with one adapter config on a BBC News subset, against controls.

Every `fit_bbc` run trains a classifier head together with the adapter, and a head alone learns BBC topics
too (0.36 at lr 3e-3, 0.71 at 1e-2, 0.825 at 3e-2), so accuracy by itself proves little. Each run is therefore checked
against two controls (numbers measured 2026-12, printed with `pytest -s`):

- head alone: the same head init, data order, steps, learning rate and tokens with the encoder frozen and no
  adapter (`head_only`, trained once per setting and cached); the method must beat its accuracy by `MARGIN`
  and end with lower training losses;
- adapter off: after training, the trained head on the bare base (`adapter_off`); accuracy must drop
  by `DROP`, so the trained model really relies on the adapter.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
from torch import nn

import peftkit
from peftkit.data import load_bbc_news
from peftkit.models import load_minilm
from peftkit.train.classify import ClassifyConfig, ClassifyResult, accuracy, encode, train_classifier

TRAIN_ROWS, TEST_ROWS = 320, 200
MAX_LENGTH = 32  # tokens per article: the headline and the first sentence
# One test article is 0.005 of accuracy; the binomial std of one accuracy on 200 articles is 0.025 at p = 0.85
# (0.032 at p = 0.7). Method and control are scored on the same articles, so their difference is less noisy than
# two independent scores (√2·0.025 = 0.035): 0.05 (10 articles) is two stds of one score and about 1.5 of an
# unpaired difference; every method clears it by more (see each test's printed numbers).
MARGIN = 0.05
LEARNS = 0.75  # an absolute floor on top of the controls, so a collapse at a weak control's setting still fails
# Switching the adapter off after training (the trained head kept) must cost as much: 10 of 200 articles. Measured:
# LoRA 0.880 -> 0.455 off; VeRA, the weakest, 0.795 -> 0.720 (its head alone: 0.710).
DROP = 0.05


@lru_cache(maxsize=1)
def bbc_subset():
    data = load_bbc_news(seed=0)
    return data["train"].shuffle(seed=0).select(range(TRAIN_ROWS)), data["test"].shuffle(seed=0).select(range(TEST_ROWS))


def bbc_accuracy(model: nn.Module, tokenizer, max_length: int = MAX_LENGTH) -> float:
    """Accuracy on the 200 test articles at `max_length` tokens."""
    test = bbc_subset()[1]
    return accuracy(model, encode(tokenizer, test["text"], max_length), torch.tensor(test["label"]))


def _fresh_minilm() -> tuple[nn.Module, object]:
    """MiniLM with a 5-way head drawn from seed 0: every run and its control start from the same head."""
    torch.manual_seed(0)
    return load_minilm(num_labels=5)


def _train(model: nn.Module, tokenizer, lr: float, epochs: int, max_length: int, **hooks: Any) -> ClassifyResult:
    train, test = bbc_subset()
    return train_classifier(model, tokenizer, train["text"], train["label"], test["text"], test["label"],
                            ClassifyConfig(epochs=epochs, batch_size=16, lr=lr, max_length=max_length), progress=False,
                            **hooks)


@lru_cache(maxsize=None)
def head_only(lr: float, max_length: int = MAX_LENGTH, epochs: int = 2) -> ClassifyResult:
    """The control: the same run with only the classifier head training (frozen encoder, no adapter).

    Cached per setting, so the suite pays one head-only run per (lr, tokens, epochs) it uses, not one per test.
    """
    model, tokenizer = _fresh_minilm()
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    result = _train(model, tokenizer, lr, epochs, max_length)
    print(f"head alone (lr {lr:g}, {max_length} tokens, {epochs} epochs): BBC accuracy {result.accuracy_after:.3f}, "
          f"last losses {mean_tail(result.losses):.3f}")
    return result


def mean_tail(losses: list[float], n: int = 5) -> float:
    """The mean of the last `n` training losses (single batches are noisy)."""
    return sum(losses[-n:]) / n


@contextmanager
def adapter_off(model: nn.Module, head: str = "classifier", name: str = "default") -> Iterator[None]:
    """The bare base with adapter `name`'s trained copy of `head` in place: the adapter switched off, its head kept."""
    module = model.get_submodule(head)
    base_head = {k: v.clone() for k, v in module.state_dict().items() if not k.startswith("peftkit.")}
    module.load_state_dict(module.peftkit[name].module.state_dict(), strict=False)
    try:
        with peftkit.disabled(model):
            yield
    finally:
        module.load_state_dict(base_head, strict=False)


def adapter_off_accuracy(model: nn.Module, tokenizer, max_length: int = MAX_LENGTH) -> float:
    with adapter_off(model):
        return bbc_accuracy(model, tokenizer, max_length)


def assert_beats_controls(result: ClassifyResult, model: nn.Module, tokenizer, lr: float, max_length: int = MAX_LENGTH,
                          epochs: int = 2, margin: float = MARGIN, drop: float = DROP, label: str = "") -> None:
    """The run beats the head alone at its setting by `margin` (and ends with lower losses), and switching the
    adapter off after training costs at least `drop` of accuracy."""
    control = head_only(lr, max_length, epochs)
    off = adapter_off_accuracy(model, tokenizer, max_length)
    print(f"{label}: accuracy {result.accuracy_after:.3f} vs head alone {control.accuracy_after:.3f} "
          f"(margin {result.accuracy_after - control.accuracy_after:+.3f}), adapter off {off:.3f}; last losses "
          f"{mean_tail(result.losses):.3f} vs head alone {mean_tail(control.losses):.3f}")
    assert result.accuracy_after >= control.accuracy_after + margin, "no better than the head alone"
    assert mean_tail(result.losses) < mean_tail(control.losses), "training loss no lower than the head alone's"
    assert off <= result.accuracy_after - drop, "the trained model does not rely on the adapter"


def fit_bbc(config: peftkit.AdapterConfig, lr: float = 3e-3, epochs: int = 2,
            on_attach: Callable[[nn.Module], dict[str, Any]] | None = None, max_length: int = MAX_LENGTH,
            margin: float | None = MARGIN, drop: float = DROP) -> tuple[ClassifyResult, nn.Module, object]:
    """Attach `config` (plus a trainable classifier head) to a fresh MiniLM, train briefly, check the controls.

    `on_attach(model)` may return extra `train_classifier` arguments (`on_step`, `regularizer`).
    `max_length` is the tokens per article, in training and in the accuracy checks. Unless `margin` is None
    (a phase that is not meant to learn on its own), `assert_beats_controls` holds the run to the head alone
    at the same setting and to the adapter switched off.

    Returns (result, model, tokenizer); the result holds accuracy before/after and the losses.
    """
    model, tokenizer = _fresh_minilm()
    if "classifier" not in config.modules_to_save:
        config = config.model_copy(update={"modules_to_save": [*config.modules_to_save, "classifier"]})
    peftkit.attach(model, config)
    hooks = on_attach(model) if on_attach is not None else {}
    result = _train(model, tokenizer, lr, epochs, max_length, **hooks)
    print(f"{config.method}: BBC accuracy {result.accuracy_before:.3f} -> {result.accuracy_after:.3f} "
          f"in {result.train_seconds:.1f}s")
    if margin is not None:
        assert_beats_controls(result, model, tokenizer, lr, max_length, epochs, margin, drop, config.method)
    return result, model, tokenizer
