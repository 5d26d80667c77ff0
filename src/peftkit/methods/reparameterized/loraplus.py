"""LoRA+: LoRA with a larger learning rate for B (Hayou et al., 2024, arXiv:2402.12354).

    lr_B = λ · lr,   lr_A = lr,   λ = 16 by default

In wide networks, A and B need different learning rates for efficient feature learning;
LoRA+ changes only the optimizer, through two parameter groups: every trainable `lora_B`
of the adapter in the fast group, everything else it trains (A, gates, task-head copies)
in the base group. `method: loraplus` is a LoRA whose config gives the trainer these groups
(`AdapterConfig.optimizer_groups`); `loraplus_param_groups` builds them for any adapter with
LoRA factors (LoRA, LoRA-FA, DyLoRA, SoRA, ...) and a hand-made optimizer. The layer, its
files and its PEFT export are plain LoRA's. PEFT's separate learning rate for embedding
factors is left out.
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field
from torch import nn

from ...core.config import register_method
from ...core.registry import adapter_deltas
from .lora import LoRA


@register_method
class LoRAPlus(LoRA):
    """LoRA config whose B factors train at `lr_ratio` times the run's learning rate."""

    method: ClassVar[str] = "loraplus"
    peft_type: ClassVar[str | None] = None  # PEFT "LORA" files load as plain LoRA, not as this
    lr_ratio: float = Field(16.0, gt=0, description="λ: B's learning rate over A's")

    def optimizer_groups(self, model: nn.Module, adapter: str, lr: float) -> list[dict[str, Any]]:
        return loraplus_param_groups(model, adapter, lr, self.lr_ratio)

    def to_peft(self) -> dict[str, Any]:
        return {**super().to_peft(), "peft_type": LoRA.peft_type}


def loraplus_param_groups(model: nn.Module, name: str, lr: float, ratio: float = 16.0,
                          weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups for adapter `name`: B factors at ratio·lr, the rest at lr (weight decay: the
    optimizer's own unless given)."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    if weight_decay is not None and weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    fast: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for _, _, delta in adapter_deltas(model, name):
        for key, param in delta.named_parameters():
            if param.requires_grad:
                (fast if key == "lora_B" else rest).append(param)
    if not fast:
        raise ValueError(f"adapter {name!r} has no trainable lora_B factors: LoRA+ needs a LoRA-family adapter")
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    groups = [{"params": rest, "lr": lr, **decay}, {"params": fast, "lr": lr * ratio, **decay}]
    return [group for group in groups if group["params"]]
