"""What a method needs around training, declared by its config next to its layer (issue #16).

A method may need more than gradient steps on its parameters: a selection on data before training
(FishMask's Fisher mask), work after each optimizer step (AdaLoRA's rank allocation, SoRA's proximal
step, ReLoRA's restarts), an extra loss term (Diff pruning's L0 penalty), a phase change (LT-SFT's
selection, Diff pruning's projection), optimizer parameter groups (LoRA+), or a field that only the
run knows (AdaLoRA's total_step). Its config says so through `AdapterConfig.fill_from_run`,
`AdapterConfig.optimizer_groups` and `AdapterConfig.training_steps`, and every entry point that trains
(`peftkit train`, `run_training`, `MultiJobTrainer`, the Hugging Face `Trainer` callback, the benchmark)
applies them, so a method runs the same everywhere. Core defines the types here so that it never imports the trainer; the
trainer's `Callback` is a `TrainingStep`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn


class TrainingStep:
    """Hooks a method (or a user, through the trainer's `Callback`) runs inside the training loop; each is a no-op
    unless overridden. `trainer` has `model`, `optimizer`, `step` (optimizer steps taken), `total_steps`, and
    `restart_optimizer(lr_scale)` for a method that changes what it trains mid-run (a fresh optimizer over the
    parameters trainable now at lr_scale × the run's learning rate, and a fresh schedule over the steps left)."""

    resumable = True  # False: a checkpoint cannot hold what the step changes (refused by name on resume)

    def on_train_begin(self, trainer: Any) -> None: ...

    def on_step_end(self, trainer: Any) -> None:
        """After `optimizer.step()` (`trainer.step` counts it), before `zero_grad()`: gradients are still there."""

    def extra_loss(self, trainer: Any) -> torch.Tensor | None:
        """A term added to the loss once per optimizer step (a regulariser)."""
        return None

    def on_evaluate(self, trainer: Any, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Any) -> None:
        """After the last step, before the final evaluation and save; it must not change the weights (the final
        metrics may be the last evaluation's)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the step carries from one optimizer step to the next (AdaLoRA's smoothed importance scores): saved in
        checkpoints, so a resumed run equals an uninterrupted one. Most steps carry nothing."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but a checkpoint holds {sorted(state)[:3]}")


class PhaseChange(TrainingStep):
    """A second training phase from optimizer step `at_step` on: `change()` alters what trains (LT-SFT's
    selection, Diff pruning's projection), then the trainer starts a fresh optimizer at `lr_scale` × the run's
    learning rate and a fresh schedule over the steps left."""

    def __init__(self, at_step: int, change: Callable[[], object], lr_scale: float = 1.0):
        self.at_step, self.change, self.lr_scale = at_step, change, lr_scale

    def on_step_end(self, trainer: Any) -> None:
        if trainer.step == self.at_step:
            self.change()
            trainer.restart_optimizer(self.lr_scale)

    def on_train_end(self, trainer: Any) -> None:
        if trainer.step < self.at_step:  # stopped early: the adapter is still phase 1's, not the method's result
            raise ValueError(f"training stopped at step {trainer.step}, before the phase change at step "
                             f"{self.at_step}: the adapter is still its first phase's (dense) change; stop later "
                             "(eval.patience, max_steps) or lower phase1_share")


class TwoPhases(BaseModel):
    """Config fields of a method that trains in two phases in one run (LT-SFT, Diff pruning)."""

    phase1_share: float = Field(0.5, gt=0, lt=1, description="share of the run's optimizer steps in phase 1")
    phase2_lr_scale: float = Field(1.0, gt=0, description="phase 2's learning rate over the run's (phase 1 "
                                                          "trains dense changes; a sparse phase 2 often wants more)")

    def phase_change(self, context: "TrainingContext", change: Callable[[], object]) -> PhaseChange:
        """The step that ends phase 1 with `change()`: round(phase1_share · steps), leaving each phase a step."""
        if context.steps < 2:
            raise ValueError(f"{self.method} trains in two phases and needs at least 2 optimizer steps; this run "
                             f"has {context.steps}")
        at_step = min(max(1, round(self.phase1_share * context.steps)), context.steps - 1)
        return PhaseChange(at_step, change, self.phase2_lr_scale)


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
