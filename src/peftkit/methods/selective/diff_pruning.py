"""Diff pruning (Guo, Rush & Kim, 2021, "Parameter-Efficient Transfer Learning with Diff Pruning",
arXiv:2012.07463) with the hard-concrete gates of Louizos, Welling & Kingma (2018, "Learning Sparse
Neural Networks through L0 Regularization", arXiv:1712.01312).

    θ = θ0 + δ,  δ = z ⊙ w,  z = min(1, max(0, s·(ζ − γ) + γ)),  s = σ((log u − log(1 − u) + log α) / β),  u ~ U(0, 1)
    penalty  λ · E[‖δ‖₀] = λ · Σ_j σ(log α_j − β · log(−γ/ζ));    at eval  z = min(1, max(0, σ(log α)(ζ − γ) + γ))
    projection: keep the round(f·N) entries of largest |δ| over all targets, zero the rest

While training, every targeted weight and bias has a dense `w` (zero at start, so a fresh adapter
changes nothing) and a gate logit `log α` per entry, and `diff_pruning_penalty(model, name)` is added to the
loss. `diff_pruning_project(model, name)` then projects the eval-mode δ onto the target sparsity in place:
the adapter becomes a plain sparse change (indices + values) whose values keep training with the mask
fixed, as in the paper's fixed-mask fine-tuning. The method's training steps do this in one run (the
penalty for the first `phase1_share` of the optimizer steps, the projection, then fixed-mask training from a
fresh optimizer at `phase2_lr_scale` × the run's learning rate). Saving a gated
adapter saves that same projection (the live adapter stays gated); files always hold indices + values.
Merging a gated adapter merges its eval-mode δ. Hosts: those of every selective method.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from ...core.registry import adapter_deltas
from ...core.config import register_method
from ...core.delta import Delta
from ...core.registry import get_registry
from ...core.training import TrainingContext, TrainingStep, TwoPhases
from .selection import Fraction, SelectionError, top_fraction
from .mask import EMPTY, Mask
from .param_diff import ParamDiff
from .sparse import SelectiveConfig, SparseDelta, masks_of


def hard_concrete_sample(log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float) -> torch.Tensor:
    """One draw of z per entry (differentiable in log α through the reparameterisation)."""
    u = torch.rand_like(log_alpha).clamp_(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def hard_concrete_mean(log_alpha: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    """The deterministic gate used at evaluation: min(1, max(0, σ(log α)(ζ − γ) + γ))."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float) -> torch.Tensor:
    """P(z ≠ 0) per entry: σ(log α − β log(−γ/ζ))."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


@register_method
class DiffPruning(TwoPhases, SelectiveConfig):
    """Diff-pruning config: kept share after projection, L0 weight, and the hard-concrete gate's constants."""

    method: ClassVar[str] = "diff_pruning"
    fraction: Fraction = 0.005
    l0_weight: float = Field(1.25e-7, ge=0, description="λ of the expected-L0 penalty (Guo et al.'s value)")
    log_alpha_init: float = Field(5.0, description="initial gate logit: gates start open (P(z ≠ 0) ≈ 1)")
    beta: float = Field(2 / 3, gt=0, description="hard-concrete temperature")
    gamma: float = Field(-0.1, lt=0, description="lower stretch limit")
    zeta: float = Field(1.1, gt=1, description="upper stretch limit")
    projected: bool = Field(False, description="the adapter holds a projected sparse diff (set in saved files)")

    def build_all(self, hosts: dict[str, nn.Module]) -> Iterator[Delta]:
        if self.projected:  # a saved adapter: plain sparse changes whose masks come from the file
            yield from super().build_all(hosts)
            return
        projection = Projection(self.fraction)
        for host in hosts.values():
            yield DiffPruningDelta(host, self.param_names, self, projection)

    def training_steps(self, context: TrainingContext) -> list[TrainingStep]:
        """The expected-L0 penalty in the loss (what makes the gates close and δ sparse) for the first half of
        the run, then the projection and fixed-mask training of the kept values for the second half."""
        if self.projected:
            return []  # a loaded, projected adapter trains its kept values with the mask fixed
        penalty = L0Penalty(diff_pruning_penalty(context.model, context.adapter))

        def project() -> None:
            diff_pruning_project(context.model, context.adapter)
            penalty.active = False  # no gates left to penalise

        return [penalty, self.phase_change(context, project)]

    def saved_config(self) -> "DiffPruning":
        return self.model_copy(update={"projected": True})


class GatedDiff(ParamDiff):
    """A whole-tensor change δ = z ⊙ w (w: `values`) with one hard-concrete gate per entry."""

    folds = False  # the change is z ⊙ w, not `values`

    def __init__(self, shape: torch.Size, device: torch.device, config: DiffPruning):
        super().__init__(shape, device, Mask.whole())
        self.log_alpha = nn.Parameter(torch.full(shape, config.log_alpha_init, dtype=torch.float32, device=device))
        self.beta, self.gamma, self.zeta = config.beta, config.gamma, config.zeta

    def gate(self) -> torch.Tensor:
        if self.training:
            return hard_concrete_sample(self.log_alpha, self.beta, self.gamma, self.zeta)
        return hard_concrete_mean(self.log_alpha, self.gamma, self.zeta)

    def dense(self) -> torch.Tensor:
        return self.gate() * self.values

    def flat_change(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every entry, with the eval-mode δ (what merge adds and the projection ranks)."""
        change = hard_concrete_mean(self.log_alpha, self.gamma, self.zeta) * self.values
        return torch.arange(self.shape.numel(), device=self.values.device), change.detach().flatten()

    def expected_l0(self) -> torch.Tensor:
        return expected_l0(self.log_alpha, self.beta, self.gamma, self.zeta).sum()


class Projection:
    """The adapter-wide magnitude projection, shared by its deltas and recomputed only after a change."""

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.deltas: list[DiffPruningDelta] = []
        self._cached: tuple[tuple, list[dict[str, Mask]]] | None = None

    def masks(self, delta: "DiffPruningDelta") -> dict[str, Mask]:
        """`delta`'s share of the top-`fraction` entries of |δ| over all the adapter's deltas."""
        stamp = tuple((id(p), p._version) for d in self.deltas for p in d.parameters())
        if self._cached is None or self._cached[0] != stamp:
            scores = {f"{i}.{param}": diff.flat_change()[1].abs() for i, d in enumerate(self.deltas) for param, diff in d.diffs()}
            chosen = top_fraction(scores, self.fraction)
            self._cached = stamp, [masks_of(str(i), chosen) for i in range(len(self.deltas))]
        return self._cached[1][next(i for i, d in enumerate(self.deltas) if d is delta)]


class DiffPruningDelta(SparseDelta):
    """Gated dense changes of one host while training; plain sparse ones after `diff_pruning_project`."""

    def __init__(self, host: nn.Module, param_names: tuple[str, ...], config: DiffPruning, projection: Projection):
        super().__init__(host, param_names, {})
        for name in self.param_names:
            setattr(self, name, GatedDiff(self._shapes[name], self._device, config))
        self.projection = projection
        projection.deltas.append(self)

    @property
    def gated(self) -> bool:
        return any(isinstance(diff, GatedDiff) for _, diff in self.diffs())

    @torch.no_grad()
    def projected(self) -> dict[str, ParamDiff]:
        """Plain diffs holding the eval-mode δ on this host's share of the projection."""
        masks, plain = self.projection.masks(self), {}
        for name, diff in self.diffs():
            kept = ParamDiff(diff.shape, self._device, masks.get(name, EMPTY).checked(diff.shape, name))
            change = diff.flat_change()[1]
            kept.values.copy_(change.view(diff.shape) if kept.is_dense else change[kept.indices])
            plain[name] = kept
        return plain

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        if not self.gated:
            return super().saved_tensors()
        return {f"{name}.{key}": value for name, diff in self.projected().items() for key, value in diff.saved().items()}


def _gated_deltas(model: nn.Module, name: str) -> list[DiffPruningDelta]:
    config = get_registry(model).require(name)
    if not isinstance(config, DiffPruning):
        raise SelectionError(f"adapter {name!r} is {config.method}, not diff_pruning")
    deltas = [d for _, _, d in adapter_deltas(model, name) if isinstance(d, DiffPruningDelta) and d.gated]
    if not deltas:
        raise SelectionError(f"diff-pruning adapter {name!r} is already projected: it has no gates left")
    return deltas


def diff_pruning_penalty(model: nn.Module, name: str = "default") -> Callable[[], torch.Tensor]:
    """The penalty λ · Σ_j P(z_j ≠ 0) over adapter `name`'s gates: a term for the training loss."""
    _gated_deltas(model, name)  # fail now, not at the first step
    weight = get_registry(model).require(name).l0_weight

    def penalty() -> torch.Tensor:
        return weight * sum(diff.expected_l0() for d in _gated_deltas(model, name) for _, diff in d.diffs())
    return penalty


def diff_pruning_project(model: nn.Module, name: str = "default") -> dict[str, Mask]:
    """Project adapter `name`'s eval-mode δ onto its target sparsity, in place; returns the kept masks.

    Its values then train with the mask fixed (build a new optimizer: the old one holds the gated tensors).
    """
    registry = get_registry(model)
    if name in registry.merged:
        raise SelectionError(f"adapter {name!r} is merged; unmerge it before projecting")
    gated = _gated_deltas(model, name)
    hosts = {id(d): host_name for host_name, _, d in adapter_deltas(model, name)}
    replacements = [(delta, delta.projected()) for delta in gated]  # all first: the projection reads every delta
    masks = {}
    for delta, diffs in replacements:
        for param, diff in diffs.items():
            setattr(delta, param, diff)
            masks[f"{hosts[id(delta)]}.{param}"] = Mask(diff.indices, diff.dim)
    return masks


class L0Penalty(TrainingStep):
    """Diff pruning's training step: λ · Σ_j P(z_j ≠ 0) added to each optimizer step's loss, until the projection."""

    def __init__(self, penalty: Callable[[], torch.Tensor]):
        self.penalty, self.active = penalty, True

    def extra_loss(self, trainer: Any) -> torch.Tensor | None:
        return self.penalty() if self.active else None
