"""A peftkit adapter's own training steps inside Hugging Face's `transformers.Trainer`.

A model with a peftkit adapter trains under `transformers.Trainer` as it is. A method that needs more than
gradient steps (a selection on data, per-step hooks, an extra loss, optimizer groups) gets them from the
`MethodSteps` callback, which runs the same `AdapterConfig.training_steps` as `peftkit train`:

    steps = MethodSteps(model, "default", total_steps=args.max_steps, batches=first_batches)  # selection runs now
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[steps],
            optimizers=(steps.optimizer(args), None)).train()

Where the hooks sit in Hugging Face's step: `on_step_end` at `on_optimizer_step` (after the optimizer step, before
the schedule and `zero_grad`, as in peftkit's engine); the extra loss is backpropagated at `on_pre_optimizer_step`,
after Hugging Face has clipped the gradients (peftkit clips after adding it: equal when `max_grad_norm` is 0).
A method that starts a fresh optimizer mid-run (LT-SFT's and Diff pruning's second phase) is refused: the callback
cannot replace the Trainer's optimizer and schedule.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..core.registry import get_registry
from ..core.training import PhaseChange, TrainingContext
from .engine import TrainingError, param_groups, to_device


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A Hugging Face model's own loss on a batch with labels (its mean over the batch)."""
    return model(**to_device(batch, next(model.parameters()).device)).loss


class _View:
    """The Hugging Face run as the method's hooks see it: model, optimizer, step, total_steps."""

    def __init__(self, model: nn.Module, optimizer: Any, step: int, total_steps: int):
        self.model, self.optimizer, self.step, self.total_steps = model, optimizer, step, total_steps

    def restart_optimizer(self, lr_scale: float = 1.0) -> None:
        raise TrainingError("a Hugging Face Trainer callback cannot start a fresh optimizer mid-run")


class MethodSteps(TrainerCallback):
    """Runs adapter `adapter`'s own training steps in a `transformers.Trainer` of `total_steps` optimizer steps.

    `batches`: the first training batches (dicts of tensors, labels included) for a method's selection on data,
    scored by `loss_fn(model, batch)` (default: the model's own loss). The selection runs here, before the Trainer
    makes its optimizer, since it changes which parameters train."""

    def __init__(self, model: nn.Module, adapter: str = "default", *, total_steps: int,
                 batches: Sequence[dict[str, torch.Tensor]] = (),
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] = model_loss):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.model, self.adapter, self.total_steps = model, adapter, total_steps
        self.config = get_registry(model).require(adapter)
        self.steps = self.config.training_steps(TrainingContext(model, adapter, total_steps, list(batches), loss_fn))
        phased = [type(step).__name__ for step in self.steps if isinstance(step, PhaseChange)]
        if phased:
            raise TrainingError(f"{self.config.method} trains in two phases with a fresh optimizer for the second, "
                                "which a Hugging Face Trainer callback cannot give: train it with peftkit train / "
                                "run_training, or run the phases as separate Trainer runs")

    def optimizer(self, args: Any) -> torch.optim.Optimizer:
        """AdamW over the adapter's trainable parameters in the method's groups (LoRA+), at `args.learning_rate` and
        `args.weight_decay`: pass it as `Trainer(optimizers=(steps.optimizer(args), None))`."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = param_groups(self.model, self.adapter, args.learning_rate, params)
        return torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)

    def _view(self, kwargs: dict[str, Any], step: int) -> _View:
        return _View(self.model, kwargs.get("optimizer"), step, self.total_steps)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps != self.total_steps:
            raise TrainingError(f"MethodSteps was built for {self.total_steps} optimizer steps but the Trainer will "
                                f"take {state.max_steps}: the method's schedule would be wrong")
        view = self._view(kwargs, state.global_step)
        for step in self.steps:
            step.on_train_begin(view)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        view = self._view(kwargs, state.global_step)
        for step in self.steps:
            extra = step.extra_loss(view)
            if extra is not None:
                extra.backward()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        view = self._view(kwargs, state.global_step + 1)  # Hugging Face counts this step after zero_grad
        for step in self.steps:
            step.on_step_end(view)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        view = self._view(kwargs, state.global_step)
        for step in self.steps:
            step.on_train_end(view)
