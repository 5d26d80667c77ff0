"""FishMask (Sung, Nair & Raffel, 2021, "Training Neural Networks with Fixed Sparse Masks", arXiv:2111.09839)
and Fish-Dip (Das et al., 2023, "Unified Low-Resource Sequence Labeling by Sample-Aware Dynamic Sparse
Finetuning", arXiv:2311.03748).

    F̂_j = 1/N Σ_i (∂ log p(y_i | x_i) / ∂θ_j)²,   M = top-k of F̂ (k = round(f·|θ|)),   θ' = θ0 + M ⊙ Δθ

FishMask fixes the mask once, before training, from a few batches (`peftkit.select`). Fish-Dip
recomputes it every `every` optimizer steps from the Fisher of the `samples` training examples
with the highest loss at that moment (its "most regressing" examples), at the current weights.
On a re-selection, entries that stay keep their change and their optimizer state; entries that
leave keep their change but freeze (they are no longer trained, exactly as a gradient mask over
the full weights would leave them); entries that join start from their current change with fresh
optimizer state. A saved Fish-Dip adapter holds every entry it ever changed.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from ...core.registry import adapter_deltas
from ...core.config import register_method
from ...core.registry import get_registry
from ...core.training import TrainingContext, TrainingStep
from .mask import EMPTY, Mask
from .selection import (FisherSelected, LossFn, NoDataError, SelectionError, classification_nll, fisher_masks,
                        scoring, split_rows)
from .param_diff import ParamDiff
from .sparse import SparseDelta


@register_method
class FishMask(FisherSelected):
    """FishMask config: `fraction` of the targets' parameters with the highest per-example empirical Fisher."""

    method: ClassVar[str] = "fishmask"


@register_method
class FishDip(FisherSelected):
    """Fish-Dip config: FishMask's rule, re-applied every `every` steps on the `samples` hardest examples."""

    method: ClassVar[str] = "fishdip"
    every: int = Field(100, gt=0, description="optimizer steps between mask re-selections")
    samples: int = Field(32, gt=0, description="number of highest-loss examples the Fisher is computed on")

    def fisher_batches(self, model: nn.Module, name: str, batches: Iterable[Any], loss_fn: LossFn) -> list[Any]:
        return hardest_examples(model, name, batches, loss_fn, self.samples)

    def training_steps(self, context: TrainingContext) -> list[TrainingStep]:
        """FishMask's selection before training, then a re-selection every `every` steps from the same batches."""
        return [*super().training_steps(context),
                Reselect(FishDipSchedule(context.model, context.adapter, context.batches, context.loss_fn))]


def hardest_examples(model: nn.Module, name: str, batches: Iterable[Any], loss_fn: LossFn, count: int) -> list[Any]:
    """The `count` examples (batches of one) with the highest loss under adapter `name` as it is now."""
    examples = [row for batch in batches for row in split_rows(batch)]
    if not examples:
        raise NoDataError(f"Fish-Dip for adapter {name!r} needs training examples to rank; the batches were empty")
    with scoring(model, name), torch.no_grad():
        losses = torch.stack([loss_fn(model, row).detach().float() for row in examples])
    return [examples[i] for i in losses.topk(min(count, len(examples))).indices.tolist()]


class FishDipSchedule:
    """Fish-Dip's re-selection during training: `schedule(step)` after each optimizer step, `bind(optimizer)` first
    (the method's training step does both). `batches` is the pool of training batches the hardest examples are
    drawn from."""

    def __init__(self, model: nn.Module, name: str, batches: Iterable[Any], loss_fn: LossFn | None = None,
                 optimizer: torch.optim.Optimizer | None = None):
        config = get_registry(model).require(name)
        if not isinstance(config, FishDip):
            raise SelectionError(f"adapter {name!r} is {config.method}, not fishdip")
        self.model, self.name, self.every = model, name, config.every
        self.batches, self.loss_fn, self.optimizer = list(batches), loss_fn or classification_nll, optimizer
        if not self.batches:
            raise NoDataError(f"Fish-Dip for adapter {name!r} needs a pool of training batches; none were given")
        self.reselections = 0

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer over the adapter's values (re-selection moves its state)."""
        self.optimizer = optimizer

    def __call__(self, step: int) -> None:
        """After optimizer step `step` (0-based): re-select when `every` steps have passed."""
        if (step + 1) % self.every:
            return
        if self.optimizer is None:
            raise SelectionError("Fish-Dip re-selection moves optimizer state: pass the optimizer or call bind(optimizer)")
        reselect(self.model, self.name, fisher_masks(self.model, self.name, self.batches, self.loss_fn), self.optimizer)
        self.reselections += 1


@torch.no_grad()
def reselect(model: nn.Module, name: str, masks: dict[str, Mask], optimizer: torch.optim.Optimizer) -> None:
    """Move adapter `name` to new masks, keeping every change made so far (see the module docstring)."""
    registry = get_registry(model)
    if name in registry.merged:
        raise SelectionError(f"adapter {name!r} is merged; unmerge it before re-selecting")
    for host_name, _, delta in adapter_deltas(model, name):
        if not isinstance(delta, SparseDelta):
            continue
        for param, diff in list(delta.diffs()):
            moved, found, position = _moved(diff, masks.get(f"{host_name}.{param}", EMPTY).checked(diff.shape, param))
            _swap_in_optimizer(optimizer, diff.values, moved.values, found, position)
            setattr(delta, param, moved)


def _lookup(keys: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, (its position in sorted `keys`, whether it is there)."""
    if keys.numel() == 0:
        return torch.zeros_like(queries), torch.zeros_like(queries, dtype=torch.bool)
    position = torch.searchsorted(keys, queries).clamp(max=keys.numel() - 1)
    return position, keys[position] == queries


def _trainable_indices(diff: ParamDiff) -> torch.Tensor:
    return torch.arange(diff.shape.numel(), device=diff.values.device) if diff.is_dense else diff.indices


def _moved(diff: ParamDiff, mask: Mask) -> tuple[ParamDiff, torch.Tensor, torch.Tensor]:
    """A diff on `mask` carrying `diff`'s changes (those outside the mask frozen), and where each new trainable
    entry was trainable before: (new diff, found, old position)."""
    if diff.dim is not None or mask.dim is not None:
        raise SelectionError("Fish-Dip re-selects element masks, not slices")
    changed, change = diff.flat_change()
    moved = ParamDiff(diff.shape, diff.values.device, mask)
    new = _trainable_indices(moved)
    position, found = _lookup(changed, new)
    moved.values.view(-1)[found] = change[position[found]]
    _, kept = _lookup(new, changed)
    moved.frozen_indices, moved.frozen_values = changed[~kept], change[~kept]
    old_position, old_found = _lookup(_trainable_indices(diff), new)
    return moved, old_found, old_position


def _swap_in_optimizer(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                       found: torch.Tensor, position: torch.Tensor) -> None:
    """Put `new` where `old` was in the optimizer; per-entry state follows the entries that stay, new ones start at 0."""
    slots = [(group["params"], i) for group in optimizer.param_groups for i, p in enumerate(group["params"]) if p is old]
    if not slots:
        raise SelectionError("the optimizer does not hold this adapter's values; give the one that trains it")
    for params, i in slots:
        params[i] = new
    state = optimizer.state.pop(old, {})
    moved = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape and value.dim() > 0:
            fresh = torch.zeros_like(new)
            fresh.view(-1)[found] = value.reshape(-1)[position[found]]
            moved[key] = fresh
        else:  # Adam's step count and other per-tensor state
            moved[key] = value
    if moved:
        optimizer.state[new] = moved


class Reselect(TrainingStep):
    """Fish-Dip's training step: its schedule bound to the run's optimizer, called after every optimizer step.
    A checkpoint cannot restore the entries a re-selection froze, so a Fish-Dip run does not resume."""

    resumable = False

    def __init__(self, schedule: FishDipSchedule):
        self.schedule = schedule

    def on_train_begin(self, trainer: Any) -> None:
        self.schedule.bind(trainer.optimizer)

    def on_step_end(self, trainer: Any) -> None:
        self.schedule(trainer.step - 1)  # the schedule counts steps from 0; trainer.step includes this one
