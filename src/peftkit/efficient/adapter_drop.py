"""AdapterDrop: adapters removed from the lower transformer layers (Rücklé et al., 2021, arXiv:2010.11918).

    h_l = layer_l(h_{l−1})                 l < n   (the base layer alone: the adapter's computation is skipped)
    h_l = layer_l(h_{l−1}; adapter_l)      l ≥ n

A layer is the number in a host's module name (`encoder.layer.3.attention.self.query` is in layer 3). At inference
a fixed n skips the first n layers' adapters. In training either the same n ("specialised" AdapterDrop) or, with
`robust`, an n drawn uniformly from {0, …, L−1} for every optimizer step, so that one adapter serves every n at
inference. Training gets faster because the base is frozen: when nothing below layer n carries a trainable
delta, autograd records none of those layers and the backward pass stops at layer n. With n = 0 the model is the
one without AdapterDrop, exactly.

Offered by methods whose config has an `adapter_drop` field (LoRA and its variants, bottleneck adapters: see
`efficient.adapter_options`), on deltas that act on their host's output.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..core.delta import ModuleCopy, Placement
from ..core.registry import adapter_deltas, get_registry
from ..core.targets import layer_number
from ..core.training import TrainingStep


class AdapterDrop(BaseModel):
    """AdapterDrop's options (a method config's `adapter_drop` field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    first_layers: int = Field(ge=0, description="n: the adapter is skipped in the model's layers 0..n−1 at inference, "
                                                "and in training unless `robust`")
    robust: bool = Field(False, description="training draws n uniformly from {0, …, L−1} for every optimizer step "
                                            "(robust AdapterDrop)")
    seed: int = Field(0, description="seed of the robust draws: step t's n depends only on (seed, t), so a resumed "
                                     "run draws what the uninterrupted one did")


@dataclass
class DropPlan:
    """One adapter's dropped layers, shared by its deltas: the first `at_inference` layers in eval mode, the first
    `in_training` in training mode (a robust step redraws it)."""

    at_inference: int
    in_training: int


@dataclass(frozen=True)
class LayerDrop:
    """A delta's place in its adapter's `DropPlan` (`core.delta.Delta.layer_drop`)."""

    layer: int
    plan: DropPlan

    def drops(self, training: bool) -> bool:
        return self.layer < (self.plan.in_training if training else self.plan.at_inference)


def adapter_drop(model: nn.Module, name: str, first_layers: int, robust: bool = False, seed: int = 0) -> None:
    """Skip adapter `name` in the model's first `first_layers` layers (0: never), from the next forward pass on.

    Recorded in the adapter's config (`adapter_drop`), so a saved adapter loads with it. `robust`: training
    (`peftkit train`, MultiJobTrainer, `MethodSteps`) draws n per optimizer step instead; this n holds at inference."""
    registry = get_registry(model)
    config = registry.require(name)
    if "adapter_drop" not in type(config).model_fields:
        raise ValueError(f"adapter {name!r} ({config.method}) has no AdapterDrop option; LoRA and its variants and "
                         "bottleneck adapters have one")
    options = AdapterDrop(first_layers=first_layers, robust=robust, seed=seed)
    install_drop(model, name, options)
    registry.configs[name] = config.model_copy(update={"adapter_drop": options})


def install_drop(model: nn.Module, name: str, options: AdapterDrop | None) -> DropPlan | None:
    """Give adapter `name`'s deltas their `LayerDrop` (none when `options` drop nothing); returns the shared plan."""
    deltas = [(host, delta) for host, _, delta in adapter_deltas(model, name) if not isinstance(delta, ModuleCopy)]
    if options is None or (options.first_layers == 0 and not options.robust):
        for _, delta in deltas:
            delta.layer_drop = None
        return None
    if name in get_registry(model).merged:
        raise ValueError(f"adapter {name!r} is merged into the base weights: unmerge it before dropping its layers")
    layers = {}
    for host, delta in deltas:
        if delta.placement not in (Placement.OUTPUT, Placement.HOST_CALL):
            raise ValueError(f"AdapterDrop skips deltas on their host's output; {type(delta).__name__} on {host} acts "
                             f"{delta.placement.value}")
        layers[host] = layer_number(host)
        if layers[host] is None:
            raise ValueError(f"AdapterDrop counts layers by the number in a module's name; {host} has none")
    count = max(layers.values()) + 1
    if options.first_layers >= count:
        raise ValueError(f"adapter_drop.first_layers={options.first_layers} would drop adapter {name!r} from every "
                         f"layer it sits in (layers 0..{count - 1})")
    plan = DropPlan(options.first_layers, options.first_layers)
    for host, delta in deltas:
        delta.layer_drop = LayerDrop(layers[host], plan)
    return plan


def dropped_layers(model: nn.Module, name: str) -> DropPlan | None:
    """Adapter `name`'s drop plan (None: it drops nothing)."""
    for _, _, delta in adapter_deltas(model, name):
        if delta.layer_drop is not None:
            return delta.layer_drop.plan
    return None


class RobustDrop(TrainingStep):
    """Robust AdapterDrop: before every optimizer step, the first n ~ U{0, …, L−1} layers are dropped in training."""

    def __init__(self, plan: DropPlan, layers: int, seed: int):
        self.plan, self.layers, self.seed = plan, layers, seed

    def draw(self, step: int) -> int:
        return random.Random(self.seed * 1_000_003 + step).randrange(self.layers)

    def on_train_begin(self, trainer: Any) -> None:
        self.plan.in_training = self.draw(trainer.step)

    def on_step_end(self, trainer: Any) -> None:
        self.plan.in_training = self.draw(trainer.step)

    def on_train_end(self, trainer: Any) -> None:
        self.plan.in_training = self.plan.at_inference


def drop_steps(model: nn.Module, name: str, options: AdapterDrop | None) -> list[TrainingStep]:
    """The training step robust AdapterDrop needs (none for a fixed n)."""
    plan = dropped_layers(model, name)
    if options is None or not options.robust or plan is None:
        return []
    layers = max(delta.layer_drop.layer for _, _, delta in adapter_deltas(model, name)
                 if delta.layer_drop is not None) + 1
    return [RobustDrop(plan, layers, options.seed)]
