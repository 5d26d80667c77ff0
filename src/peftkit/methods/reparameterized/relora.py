"""ReLoRA: high-rank training through low-rank updates (Lialin et al., 2023, arXiv:2307.05695).

    every T steps:  W0 ← W0 + s·B A;   A ← fresh init, B ← 0;   prune the optimizer state of A and B

Training a LoRA adapter and periodically folding it into the base ("merge-and-reinit")
sums rank-r updates, so the total update can be high rank. A restart leaves the outputs
unchanged (ΔW moves into W0 and the fresh B A is 0); the optimizer state of the factors is
reset by magnitude pruning (the paper prunes 99%; here one mask per factor, so no first
moment outlives its second), so the next cycle is not steered by the last one. The paper also
re-warms the learning rate after each restart (a jagged schedule): that is the caller's scheduler.

Restarts change the base weights for good; that is the training. Removing the adapter
afterwards drops only the part trained since the last restart, and every row sees the
updated base: bare-base rows and other adapters included. A saved adapter likewise holds
only that last part, so keep the base too, or `unload` the model at the end (the paper's
final model). `method: relora` is a LoRA whose training steps restart it every `restart_every`
optimizer steps (`peftkit train`, `MultiJobTrainer` alone: its restarts change the base that
other jobs share, so it is refused beside them); `relora_restart` does one restart by hand.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ...core.config import register_method
from ...core.registry import adapter_deltas, get_registry
from ...core.training import TrainingContext, TrainingStep
from .lora import LoRA, LoRADelta


@register_method
class ReLoRA(LoRA):
    """LoRA config that merges and restarts every `restart_every` optimizer steps."""

    method: ClassVar[str] = "relora"
    peft_type: ClassVar[str | None] = None  # PEFT "LORA" files load as plain LoRA, not as this
    trains_base: ClassVar[bool] = True
    init: Literal["zero", "gaussian"] = Field("zero", description="A kaiming-uniform (zero: B = 0) or gaussian")
    restart_every: int = Field(100, gt=0, description="optimizer steps between merge-and-restarts")
    prune_ratio: float = Field(0.99, ge=0.0, le=1.0, description="share of the factors' optimizer state zeroed")

    def training_steps(self, context: TrainingContext) -> list[TrainingStep]:
        return [Restarts(context.model, context.adapter, self.restart_every, self.prune_ratio)]

    def to_peft(self) -> dict[str, Any]:
        return {**super().to_peft(), "peft_type": LoRA.peft_type}


class Restarts(TrainingStep):
    """ReLoRA's training step: a merge-and-restart after every `every` optimizer steps, except after the last."""

    def __init__(self, model: nn.Module, adapter: str, every: int, prune_ratio: float):
        self.model, self.adapter, self.every, self.prune_ratio = model, adapter, every, prune_ratio
        self.restarts = 0

    def on_step_end(self, trainer: Any) -> None:
        if trainer.step % self.every == 0 and trainer.step < trainer.total_steps:
            relora_restart(self.model, self.adapter, trainer.optimizer, self.prune_ratio)
            self.restarts += 1


@torch.no_grad()
def relora_restart(model: nn.Module, name: str, optimizer: torch.optim.Optimizer, prune_ratio: float = 0.99) -> None:
    """Merge LoRA adapter `name` into the base, re-initialise it and prune its factors' optimizer state.

    `prune_ratio` is the share of each factor's entries whose moments are zeroed, smallest second moments first
    (1.0: full reset).
    """
    if not 0.0 <= prune_ratio <= 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1], got {prune_ratio}")
    registry = get_registry(model)
    config = registry.require(name)
    if not isinstance(config, LoRA) or config.rewrites_base:
        raise ValueError(f"ReLoRA restarts a LoRA adapter with an untouched base; {name!r} is a "
                         f"{config.method} adapter{' with PiSSA init' if config.rewrites_base else ''}")
    if name in registry.merged:
        raise ValueError(f"adapter {name!r} is merged; unmerge it before a ReLoRA restart")
    for _, host, delta in adapter_deltas(model, name):
        if not isinstance(delta, LoRADelta):  # task-head copies train on as they are
            continue
        delta.merge_into(host)
        delta._initialise(host, config.init)  # the method's own init: a fresh A (an Embedding's: B)
        if delta.kind != "embedding":
            delta.lora_B.zero_()
        for factor in (delta.lora_A, delta.lora_B):
            _prune_state(optimizer.state.get(factor, {}), factor, prune_ratio)


def _prune_state(state: dict, param: torch.Tensor, ratio: float) -> None:
    """Zero the same smallest `ratio` of entries in every per-element moment (exp_avg, exp_avg_sq, momentum...).

    One mask, ranked by Adam's second moment where there is one: pruning each moment by its own magnitudes keeps
    first moments whose second moment is gone, and A's gradient is zero right after a restart (B = 0), so Adam's
    next step there is m / (0 + eps): a 1e8-fold step that wrecked training (BBC accuracy at chance).
    """
    # Adam's scalar step count is not a per-element moment; no moments at all: no step taken yet
    moments = [value for value in state.values() if torch.is_tensor(value) and value.shape == param.shape]
    count = int(ratio * param.numel())
    if not moments or count == 0:
        return
    ranking = state.get("exp_avg_sq", moments[0]).abs()
    drop = ranking <= ranking.flatten().kthvalue(count).values  # count = numel: the largest, so every entry
    for moment in moments:
        moment.masked_fill_(drop, 0.0)
