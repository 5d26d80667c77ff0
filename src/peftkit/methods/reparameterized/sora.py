"""SoRA: sparse low-rank adaptation (Ding et al., 2023, arXiv:2311.11696).

    h = W0 x + s · B (g ⊙ A x),   g ∈ R^r,   after each optimizer step: g ← sign(g) · max(|g| − η·λ, 0)

A gate between the down- and up-projection is trained by proximal gradient descent: the
optimizer takes the ordinary step and `sora_proximal_step` applies the L1 proximal operator
(soft thresholding), which sets gates exactly to zero. A zero gate switches its rank-one
component off, so saving drops it (its row of A, column of B and entry of g): each layer's
rank shrinks below r without changing outputs, and loading takes the file's ranks.
`sora_prune` does the same in place. ΔW = s · B diag(g) A merges. s = α/r keeps the configured r.

The gate starts N(0, 1) as in the authors' code; B = 0 makes a fresh adapter a no-op.
Hosts: Linear, Conv1D.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...core.registry import adapter_deltas
from ...core.config import AdapterConfig, register_method
from ...core.hosts import LINEAR_TYPES
from ...core.registry import get_registry
from ...core.training import TrainingContext, TrainingStep
from .lora import LoRA, LoRADelta


@register_method
class SoRA(AdapterConfig):
    """SoRA config: the largest rank, the scaling numerator and dropout on A's input."""

    method: ClassVar[str] = "sora"
    r: int = Field(8, gt=0, description="rank before pruning: the size of A, B and the gate")
    alpha: float = Field(8.0, gt=0, description="scaling numerator: s = alpha/r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of A")

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def build(self, host: nn.Module) -> "SoRADelta":
        return SoRADelta(host, self)

    def training_steps(self, context: TrainingContext) -> list[TrainingStep]:
        """The proximal step on the gates after every optimizer step: what drives gate entries to exact zeros."""
        return [GateProximalStep(context)]


class SoRADelta(LoRADelta):
    """A LoRA pair with a gate on its r components: increment(x) = s · B (g ⊙ A x)."""

    def __init__(self, host: nn.Module, config: SoRA):
        super().__init__(host, LoRA(r=config.r, alpha=config.alpha, dropout=config.dropout, targets=config.targets))
        self.gate = nn.Parameter(torch.randn(config.r, device=self.lora_A.device))  # [r]

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._down(x) * self.gate, self.lora_B) * self.scaling  # [..., r] -> [..., out]

    def delta_weight(self) -> torch.Tensor:
        return ((self.lora_B.float() * self.gate.float()) @ self.lora_A.float()) * self.scaling  # [out, in]

    def _parts(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """A, B and g restricted to the components `keep` selects (a mask or indices)."""
        a, b, g = self.lora_A.detach(), self.lora_B.detach(), self.gate.detach()
        return {"lora_A": a[keep], "lora_B": b[:, keep], "gate": g[keep]}  # [k, in], [out, k], [k]

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return self._parts(self.gate.detach() != 0)  # a zero gate contributes exactly nothing

    @torch.no_grad()
    def keep(self, keep: torch.Tensor) -> None:
        """Keep only the selected components (new parameters: rebuild any optimizer afterwards)."""
        for key, value in self._parts(keep).items():
            setattr(self, key, nn.Parameter(value.clone(), requires_grad=getattr(self, key).requires_grad))

    def prepare_load(self, saved: dict[str, torch.Tensor]) -> None:
        """A pruned file holds fewer components: take its rank (the shape checks that follow still apply)."""
        gate = saved.get("gate")
        if gate is not None and gate.dim() == 1 and gate.shape[0] <= self.gate.shape[0]:
            self.keep(torch.arange(gate.shape[0]))


def _sora_deltas(model: nn.Module, name: str) -> dict[str, SoRADelta]:
    """Host module name -> SoRA delta of adapter `name` (task-head copies left out)."""
    registry = get_registry(model)
    config = registry.require(name)
    if not isinstance(config, SoRA):
        raise ValueError(f"adapter {name!r} is a {config.method} adapter, not SoRA")
    return {host_name: delta for host_name, _, delta in adapter_deltas(model, name) if isinstance(delta, SoRADelta)}


@torch.no_grad()
def sora_proximal_step(model: nn.Module, name: str, lr: float, lam: float) -> int:
    """Soft-threshold every gate of adapter `name` by lr·lam; returns how many gates stay non-zero."""
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    alive = 0
    for delta in _sora_deltas(model, name).values():
        gate = delta.gate
        gate.copy_(gate.sign() * (gate.abs() - lr * lam).clamp_min(0))
        alive += int(gate.count_nonzero())
    return alive


def sora_prune(model: nn.Module, name: str) -> dict[str, int]:
    """Drop the zero-gated components of adapter `name` in place; returns each layer's new rank."""
    deltas = _sora_deltas(model, name)
    for delta in deltas.values():
        delta.keep(delta.gate.detach() != 0)
    return {host_name: delta.gate.shape[0] for host_name, delta in deltas.items()}


class GateProximalStep(TrainingStep):
    """SoRA's training step: soft-threshold the gates at the optimizer's current lr, λ = 1 (the paper's default scale)."""

    def __init__(self, context: TrainingContext):
        self.model, self.adapter = context.model, context.adapter

    def on_step_end(self, trainer: Any) -> None:
        sora_proximal_step(self.model, self.adapter, lr=trainer.optimizer.param_groups[0]["lr"], lam=1.0)
