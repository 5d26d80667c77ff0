"""Shared learning check: fine-tune MiniLM-L6 with one adapter config on a BBC News subset, against controls.

Every run goes through peftkit's trainer as `peftkit train` runs it (`run_training`: the method's own training
steps included), on the CPU in fp32. Every `fit_bbc` run trains a classifier head together with the adapter, and a
head alone learns BBC topics too (0.365 at lr 3e-3, 0.685 at 1e-2, 0.80 at 3e-2), so accuracy by itself proves
little. Each run is therefore checked against two controls (numbers measured 2026-12, printed with `pytest -s`):

- head alone: the same head init, data order, steps, learning rate and tokens with the encoder frozen and only the
  head training (`head_only`: an adapter frozen at its no-op start, its head copy training; trained once per setting
  and cached); the method must beat its accuracy by `MARGIN` and end with lower training losses;
- adapter off: after training, the trained head on the bare base (`adapter_off`); accuracy must drop
  by `DROP`, so the trained model really relies on the adapter.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

import peftkit
from peftkit.train import (TASKS, Callback, TaskData, Trainer, TrainConfig, TrainResult, config_from_mapping, prepare,
                           run_training)
from peftkit.train.config import DataSection

TRAIN_ROWS, TEST_ROWS = 320, 200
MAX_LENGTH = 32  # tokens per article: the headline and the first sentence
# One test article is 0.005 of accuracy; the binomial std of one accuracy on 200 articles is 0.025 at p = 0.85
# (0.032 at p = 0.7). Method and control are scored on the same articles, so their difference is less noisy than
# two independent scores (√2·0.025 = 0.035): 0.05 (10 articles) is two stds of one score and about 1.5 of an
# unpaired difference; every method clears it by more (see each test's printed numbers).
MARGIN = 0.05
LEARNS = 0.75  # an absolute floor on top of the controls, so a collapse at a weak control's setting still fails
# Switching the adapter off after training (the trained head kept) must cost as much: 10 of 200 articles. Measured:
# LoRA 0.845 -> 0.415 off; VeRA, the weakest, 0.785 -> 0.715 (its head alone: 0.685).
DROP = 0.05


@dataclass
class BBCRun:
    """A training run on the BBC subset: test accuracy before and after, and each optimizer step's loss."""

    accuracy_before: float
    accuracy_after: float
    losses: list[float]
    steps: int
    train_seconds: float


def _bbc_section(max_length: int) -> DataSection:
    """The first TRAIN_ROWS / TEST_ROWS articles of BBC News' splits shuffled with seed 0 (the runs' seed)."""
    return DataSection(name="bbc-news", max_length=max_length, train_limit=TRAIN_ROWS, eval_limit=TEST_ROWS)


def bbc_config(method: peftkit.AdapterConfig, lr: float, epochs: int = 2, max_length: int = MAX_LENGTH,
               adapter_name: str = "default") -> TrainConfig:
    """The trainer's config for adapter `adapter_name` (`method`) on the BBC subset: batches of 16, AdamW with
    linear decay, CPU and fp32, the final model kept (no checkpoints)."""
    return config_from_mapping({
        "method": method.to_dict(), "adapter_name": adapter_name, "data": _bbc_section(max_length).model_dump(),
        "optimizer": {"lr": lr}, "schedule": {"epochs": epochs, "batch_size": 16},
        "eval": {"restore_best": False}, "output": {"save": False, "plot": False},
        "seed": 0, "device": "cpu", "precision": "fp32", "progress": False,
    })


@lru_cache(maxsize=None)
def bbc_data(max_length: int = MAX_LENGTH) -> TaskData:
    """The BBC subset as the classify-text task encodes it for MiniLM, at `max_length` tokens."""
    from peftkit.models import load_minilm

    section, task = _bbc_section(max_length), TASKS["classify-text"]()
    return task.encode(task.read_data(section, seed=0), load_minilm()[1], section)


def bbc_inputs(rows: int, max_length: int = MAX_LENGTH) -> dict[str, torch.Tensor]:
    """The model inputs of the first `rows` test articles."""
    return {k: v[:rows] for k, v in bbc_data(max_length).eval.items() if k != "labels"}


@torch.inference_mode()
def bbc_accuracy(model: nn.Module, max_length: int = MAX_LENGTH) -> float:
    """Accuracy on the TEST_ROWS test articles at `max_length` tokens, scored by the classify-text task."""
    task, rows = TASKS["classify-text"](), bbc_data(max_length).eval
    was_training = model.training
    model.eval()
    correct = sum(int(task.row_stats(model, task.collate(rows, idx)).correct.sum())
                  for idx in torch.arange(TEST_ROWS).split(64))
    model.train(was_training)
    return correct / TEST_ROWS


def _run(config: TrainConfig, fit: Callable[[TrainConfig], TrainResult]) -> tuple[BBCRun, TrainResult]:
    """`fit(config)` with its output (the metrics file: the training losses) in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="peftkit-bbc-") as folder:
        result = fit(config.model_copy(update={"output": config.output.model_copy(update={"dir": Path(folder)})}))
        records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if record["kind"] == "train"]
    return BBCRun(result.before["accuracy"], result.after["accuracy"], losses, result.steps, result.train_seconds), result


def train_attached(model: nn.Module, config: TrainConfig, data: TaskData | None = None,
                   callbacks: Sequence[Callback] = ()) -> BBCRun:
    """Train what is trainable in `model` now (its adapters already attached) as `config` says, on `data` (default:
    the BBC subset at the config's tokens); the method's own training steps are not added."""
    data = data if data is not None else bbc_data(config.data.max_length)
    return _run(config, lambda c: Trainer(model, TASKS[c.task](), data, c, callbacks).fit())[0]


@lru_cache(maxsize=None)
def head_only(lr: float, max_length: int = MAX_LENGTH, epochs: int = 2) -> BBCRun:
    """The control: the same run with only the classifier head training (frozen encoder, adapter frozen at zero).

    Cached per setting, so the suite pays one head-only run per (lr, tokens, epochs) it uses, not one per test.
    """
    def fit(config: TrainConfig) -> TrainResult:
        model, processor, task, data = prepare(config)  # the head drawn as in every fit_bbc run
        peftkit.set_trainable(model, config.adapter_name, False)  # LoRA's B = 0: the base's outputs exactly
        model.classifier.peftkit[config.adapter_name].requires_grad_(True)
        return Trainer(model, task, data, config, processor=processor).fit()

    result, _ = _run(bbc_config(peftkit.LoRA(r=1, targets=["query"]), lr, epochs, max_length), fit)
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


def adapter_off_accuracy(model: nn.Module, max_length: int = MAX_LENGTH) -> float:
    with adapter_off(model):
        return bbc_accuracy(model, max_length)


def assert_beats_controls(result: BBCRun, model: nn.Module, lr: float, max_length: int = MAX_LENGTH,
                          epochs: int = 2, margin: float = MARGIN, drop: float = DROP, label: str = "") -> None:
    """The run beats the head alone at its setting by `margin` (and ends with lower losses), and switching the
    adapter off after training costs at least `drop` of accuracy."""
    control = head_only(lr, max_length, epochs)
    off = adapter_off_accuracy(model, max_length)
    print(f"{label}: accuracy {result.accuracy_after:.3f} vs head alone {control.accuracy_after:.3f} "
          f"(margin {result.accuracy_after - control.accuracy_after:+.3f}), adapter off {off:.3f}; last losses "
          f"{mean_tail(result.losses):.3f} vs head alone {mean_tail(control.losses):.3f}")
    assert result.accuracy_after >= control.accuracy_after + margin, "no better than the head alone"
    assert mean_tail(result.losses) < mean_tail(control.losses), "training loss no lower than the head alone's"
    assert off <= result.accuracy_after - drop, "the trained model does not rely on the adapter"


def fit_bbc(config: peftkit.AdapterConfig, lr: float = 3e-3, epochs: int = 2, callbacks: Sequence[Callback] = (),
            max_length: int = MAX_LENGTH, margin: float | None = MARGIN,
            drop: float = DROP) -> tuple[BBCRun, nn.Module, object]:
    """Train `config` (plus a trainable copy of the classifier head) on a fresh MiniLM with `run_training`, briefly,
    and check the controls.

    `callbacks` run after the method's own training steps. `max_length` is the tokens per article, in training and
    in the accuracy checks. Unless `margin` is None (a phase that is not meant to learn on its own),
    `assert_beats_controls` holds the run to the head alone at the same setting and to the adapter switched off.

    Returns (result, model, tokenizer); the result holds accuracy before/after and the losses.
    """
    result, trained = _run(bbc_config(config, lr, epochs, max_length), lambda c: run_training(c, callbacks=callbacks))
    print(f"{config.method}: BBC accuracy {result.accuracy_before:.3f} -> {result.accuracy_after:.3f} "
          f"in {result.train_seconds:.1f}s")
    if margin is not None:
        assert_beats_controls(result, trained.model, lr, max_length, epochs, margin, drop, config.method)
    return result, trained.model, trained.processor
