"""What a method needs around training, declared by its config next to its layer (issue #16).

A method may need more than gradient steps on its parameters: a selection on data before training
(FishMask's Fisher mask), work after each optimizer step (AdaLoRA's rank allocation, SoRA's proximal
step), an extra loss term (Diff pruning's L0 penalty), or a field that only the run knows (AdaLoRA's
total_step). Its config says so through `AdapterConfig.fill_from_run` and `AdapterConfig.training_steps`,
and every entry point that trains (`peftkit train`, `run_training`, the benchmark) applies them, so a
method runs the same everywhere. Core defines the types here so that it never imports the trainer; the
trainer's `Callback` is a `TrainingStep`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class TrainingStep:
    """Hooks a method (or a user, through the trainer's `Callback`) runs inside the training loop; each is a no-op
    unless overridden. `trainer` has `model`, `optimizer`, `step` (optimizer steps taken) and `total_steps`."""

    def on_train_begin(self, trainer: Any) -> None: ...

    def on_step_end(self, trainer: Any) -> None:
        """After `optimizer.step()` (`trainer.step` counts it), before `zero_grad()`: gradients are still there."""

    def extra_loss(self, trainer: Any) -> torch.Tensor | None:
        """A term added to the loss once per optimizer step (a regulariser)."""
        return None

    def on_evaluate(self, trainer: Any, metrics: dict[str, float]) -> None: ...


@dataclass(frozen=True)
class TrainingContext:
    """What a method's training steps may use: the model with the adapter attached, the adapter's name, the run's
    optimizer steps, and for a selection on data a few training batches (on the model's device) with the task's
    mean-loss function `loss_fn(model, batch)`."""

    model: nn.Module
    adapter: str
    steps: int
    batches: list[Any] = field(default_factory=list)
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
