"""LoRA+: LoRA with a larger learning rate for B (Hayou et al., 2024, arXiv:2402.12354).

    lr_B = λ · lr,   lr_A = lr,   λ = 16 by default

In wide networks, A and B need different learning rates for efficient feature learning;
LoRA+ changes only the optimizer, through two parameter groups: every trainable `lora_B`
of the adapter in the fast group, everything else it trains (A, gates, task-head copies)
in the base group. Works for any adapter with LoRA factors (LoRA, LoRA-FA, DyLoRA, SoRA, ...).
PEFT's separate learning rate for embedding factors is left out.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ...core.registry import adapter_deltas


def loraplus_param_groups(model: nn.Module, name: str, lr: float, ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups for adapter `name`: B factors at ratio·lr, the rest at lr."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    fast: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for _, _, delta in adapter_deltas(model, name):
        for key, param in delta.named_parameters():
            if param.requires_grad:
                (fast if key == "lora_B" else rest).append(param)
    if not fast:
        raise ValueError(f"adapter {name!r} has no trainable lora_B factors: LoRA+ needs a LoRA-family adapter")
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay},
              {"params": fast, "lr": lr * ratio, "weight_decay": weight_decay}]
    return [group for group in groups if group["params"]]
