"""Child-Tuning (Xu et al., 2021, "Raise a Child in Large Language Model", arXiv:2109.05687).

    Child-Tuning_D:  M = top-p of F̂ (Fisher of each batch's loss, averaged over batches);  g ← M ⊙ g
    Child-Tuning_F:  M_t ~ Bernoulli(p) drawn afresh for every backward pass;            g ← M_t ⊙ g / p

Child-Tuning_D fixes a Fisher-selected child network before training (`peftkit.select`); it is
FishMask with the reference code's per-batch Fisher (its per-parameter gradient clipping is
left out) and stores indices + values. Child-Tuning_F is task-free: every targeted parameter
may change, each step trains a random child, and the gradient is scaled by 1/p so its expected
value is unchanged. Since any entry may move, its change is stored as dense blocks (the whole
ΔW of each targeted tensor); the Bernoulli mask is a gradient hook on those blocks, so it needs
no change to the training loop and holds for any optimizer. AdamW's momentum still moves entries
outside the current child, as in the paper's ChildTuningAdamW, but never anything outside the targets.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from ...core.config import register_method
from .mask import Mask
from .selection import FisherSelected, Fraction
from .sparse import SelectiveConfig, SparseDelta, whole_masks


@register_method
class ChildTuningD(FisherSelected):
    """Child-Tuning_D config: the `fraction` of the targets' parameters with the highest per-batch Fisher."""

    method: ClassVar[str] = "child_tuning_d"
    fraction: Fraction = 0.3
    fisher: Literal["per_example", "per_batch"] = "per_batch"


@register_method
class ChildTuningF(SelectiveConfig):
    """Child-Tuning_F config: each entry's gradient is kept with probability `p` (and scaled by 1/p)."""

    method: ClassVar[str] = "child_tuning_f"
    needs_gradients: ClassVar[str | None] = "its child network is a Bernoulli mask on each backward pass's gradient"
    p: Fraction = 0.3

    def masks(self, hosts: dict[str, nn.Module]) -> dict[str, Mask]:
        return whole_masks(hosts, self.param_names)

    def make_delta(self, host: nn.Module, masks: dict[str, Mask] | None) -> "ChildTuningFDelta":
        return ChildTuningFDelta(host, self.param_names, masks, self.p)


class ChildTuningFDelta(SparseDelta):
    """Dense changes whose gradient is masked by a fresh Bernoulli(p) draw and scaled by 1/p in every backward pass."""

    def __init__(self, host: nn.Module, param_names: tuple[str, ...], masks: dict[str, Mask] | None, p: float):
        self.p = p  # before SparseDelta.__init__, whose `install` registers the hooks
        super().__init__(host, param_names, masks)

    def install(self, masks: dict[str, Mask]) -> None:
        super().install(masks)
        for _, diff in self.diffs():
            diff.values.register_hook(self._child_gradient)

    def _child_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * torch.bernoulli(torch.full_like(grad, self.p)) / self.p
