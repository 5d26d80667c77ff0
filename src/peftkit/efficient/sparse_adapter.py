"""SparseAdapter: adapters pruned at initialisation to a target sparsity (He et al., 2022, arXiv:2210.04284).

    magnitude: s_j = |θ_j|            SNIP: s_j = |θ_j · ∂L/∂θ_j|   (∂L/∂θ on a few batches, at initialisation)
    m = 1 on the n − round(sparsity · n) highest scores of each weight tensor (n entries), 0 elsewhere
    θ ← m ⊙ θ, and ∂L/∂θ ← m ⊙ ∂L/∂θ for the rest of training

Every weight tensor of the adapter (LoRA's A and B, a bottleneck adapter's down- and up-projection; not biases,
not a trained head copy) keeps exactly its share, so the adapter has the target sparsity. The masks live beside the
weights (`core.weight_masks`): pruned entries get no gradient, so they stay zero through any optimizer, and the
adapter is saved sparse (kept values + mask bits) and loads with its masks.

A zero-initialised tensor (LoRA's B, a bottleneck's up-projection) has nothing to rank at initialisation: |θ| and
θ·∂L/∂θ are zero everywhere. SNIP ranks it by |∂L/∂θ|, where the first optimizer step moves it; the tensor in front
of it then has a zero gradient and is ranked by |θ|. Magnitude pruning keeps a random (seeded) share of it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..core.delta import Delta, ModuleCopy
from ..core.registry import adapter_deltas, get_registry
from ..core.training import TrainingStep
from ..core.weight_masks import apply_masks, install_masks, weight_masks

if TYPE_CHECKING:
    from ..methods.selective.selection import LossFn

PruneMethod = Literal["magnitude", "snip"]


class Prune(BaseModel):
    """SparseAdapter's options (a method config's `prune` field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sparsity: float = Field(gt=0, lt=1, description="share of each adapter weight tensor pruned to zero")
    method: PruneMethod = Field("magnitude", description="magnitude |θ| (at attach), or SNIP |θ·∂L/∂θ| on the "
                                                         "run's first batches (before training)")
    seed: int = Field(0, description="seed of the random share kept of a tensor magnitude cannot rank (all zero)")


def prunable(model: nn.Module, name: str) -> list[tuple[str, Delta, str, nn.Parameter]]:
    """(host, delta, parameter name, parameter) of every weight tensor of adapter `name` (2 or more dimensions; no
    head copies)."""
    return [(host, delta, path, param) for host, _, delta in adapter_deltas(model, name)
            if not isinstance(delta, ModuleCopy)
            for path, param in delta.named_parameters() if param.dim() >= 2]


def prune_adapter(model: nn.Module, name: str, sparsity: float, method: PruneMethod = "magnitude",
                  data: Iterable[Any] = (), loss_fn: "LossFn | None" = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Prune adapter `name`'s weight tensors to `sparsity` and keep them so (see the module docstring); returns the
    keep-masks by `<host>.<parameter>`.

    SNIP scores on `data`, batches for `loss_fn(model, batch)` (the batch's mean loss; default: cross-entropy of
    `model(**inputs)` for batches `(inputs, labels)`). Recorded in the adapter's config (`prune`)."""
    registry = get_registry(model)
    config = registry.require(name)
    if "prune" not in type(config).model_fields:
        raise ValueError(f"adapter {name!r} ({config.method}) has no pruning option; LoRA and its variants and "
                         "bottleneck adapters have one")
    if name in registry.merged or registry.plan is not None:
        raise ValueError(f"cannot prune adapter {name!r} while it is merged or inside peftkit.routed")
    options = Prune(sparsity=sparsity, method=method, seed=seed)
    tensors = prunable(model, name)
    if not tensors:
        raise ValueError(f"adapter {name!r} has no weight tensors to prune")
    scores = _snip_scores(model, name, tensors, data, loss_fn) if method == "snip" else [
        param.detach().abs() for *_, param in tensors]
    generator = torch.Generator().manual_seed(seed)
    masks: dict[str, torch.Tensor] = {}
    by_delta: dict[int, tuple[Delta, dict[str, torch.Tensor]]] = {}
    for (host, delta, path, param), score in zip(tensors, scores):
        mask = _keep_mask(score, sparsity, generator)
        masks[f"{host}.{path}"] = mask
        by_delta.setdefault(id(delta), (delta, {}))[1][path] = mask
    for delta, delta_masks in by_delta.values():
        install_masks(delta, delta_masks)
    registry.configs[name] = config.model_copy(update={"prune": options})
    return masks


def _snip_scores(model: nn.Module, name: str, tensors: list[tuple[str, Delta, str, nn.Parameter]],
                 data: Iterable[Any], loss_fn: "LossFn | None") -> list[torch.Tensor]:
    """|θ·g| per tensor, g the batches' gradients of their mean losses, summed (the ranking of their mean); |g|, then
    |θ|, where that is zero everywhere (a zero-initialised factor, the factor in front of it)."""
    from ..methods.selective.selection import classification_nll  # the methods package imports this module

    params = [param for *_, param in tensors]
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    registry = get_registry(model)
    active, training, flags = registry.active, model.training, [p.requires_grad for p in params]
    registry.active = [name]  # the adapter alone, without dropout
    model.eval()
    count = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in data:
            for total, grad in zip(grads, torch.autograd.grad((loss_fn or classification_nll)(model, batch), params,
                                                              allow_unused=True)):
                if grad is not None:
                    total += grad.float()
            count += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        registry.active = active
        model.train(training)
    if count == 0:
        raise ValueError(f"SNIP pruning of adapter {name!r} needs at least one batch of data; none was given")
    scores = []
    for param, grad in zip(params, grads):
        theta = param.detach().float()
        candidates = ((theta * grad).abs(), grad.abs(), theta.abs())
        scores.append(next((s for s in candidates if bool(s.any())), candidates[0]))
    return scores


def _keep_mask(score: torch.Tensor, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """True on the n − round(sparsity·n) highest scores (random ones when every score is zero)."""
    flat = score.flatten().float().cpu()
    if not bool(flat.any()):
        flat = torch.rand(flat.shape, generator=generator)
    keep = flat.numel() - round(sparsity * flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[flat.topk(keep).indices] = True
    return mask.view(score.shape).to(score.device)


def hold_masks(model: nn.Module, name: str) -> None:
    """Keep-everything masks on adapter `name`'s weight tensors: a pruned adapter's places, which pruning or a load
    fills (a saved file must then bring its masks)."""
    by_delta: dict[int, tuple[Delta, dict[str, torch.Tensor]]] = {}
    for _, delta, path, param in prunable(model, name):
        by_delta.setdefault(id(delta), (delta, {}))[1][path] = torch.ones_like(param, dtype=torch.bool)
    for delta, masks in by_delta.values():
        install_masks(delta, masks)


class KeepMasks(TrainingStep):
    """After every optimizer step, pruned entries are set to zero again (their gradients are masked already; this
    guards against an optimizer that moves an entry without a gradient)."""

    def __init__(self, deltas: list[Delta]):
        self.deltas = deltas

    def on_step_end(self, trainer: Any) -> None:
        for delta in self.deltas:
            apply_masks(delta)


def mask_steps(model: nn.Module, name: str) -> list[TrainingStep]:
    deltas = [delta for _, _, delta in adapter_deltas(model, name) if weight_masks(delta) is not None]
    return [KeepMasks(deltas)] if deltas else []
