"""Choosing which parameters a selective adapter trains: scores -> exact top-fraction masks.

    FishMask's empirical Fisher:  F̂_j = 1/N Σ_i (∂ log p(y_i | x_i) / ∂θ_j)²   (per example i)

Child-Tuning_D's reference code squares the gradient of each *batch's* mean loss instead and
averages over batches (`per_batch`); both are here, and both are tested against a hand count.
Scores and masks are keyed like `model.named_parameters()`: `<host module>.<param>`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...core.registry import adapter_deltas
from ...core.registry import get_registry
from ...core.training import TrainingContext, TrainingStep
from .mask import Mask, MaskError
from .sparse import SelectiveConfig, SparseDelta, masks_of

Scores = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
Fraction = Annotated[float, Field(gt=0, le=1, description="share of the candidate parameters to train, in (0, 1]")]


class SelectionError(ValueError):
    """A selection that cannot be made: a fraction outside (0, 1], no data, a method that selects at attach."""


class NoDataError(SelectionError):
    """Fisher scores asked for with no examples to compute them on."""


def check_fraction(fraction: float) -> float:
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise SelectionError(f"fraction must be in (0, 1], got {fraction!r}")
    return float(fraction)


def top_fraction(scores: Scores, fraction: float, largest: bool = True) -> dict[str, Mask]:
    """The round(fraction·N) highest-scoring entries over all tensors together (N: all entries), as masks.

    Exactly that many, ties broken arbitrarily; `largest=False` picks the lowest scores (PaFi).
    """
    check_fraction(fraction)
    if not scores:
        raise SelectionError("no scores to select from")
    flat = torch.cat([s.detach().flatten().float() for s in scores.values()])
    count = max(1, round(fraction * flat.numel()))
    chosen = flat.topk(count, largest=largest, sorted=False).indices.sort().values
    masks, start = {}, 0
    for key, score in scores.items():
        end = start + score.numel()
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, end])).tolist()
        masks[key] = Mask.elements(chosen[lo:hi] - start)
        start = end
    return masks


def candidates(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The base parameters a selective adapter may change, keyed `<host>.<param>`."""
    found = {}
    for host_name, host, delta in adapter_deltas(model, name):
        if isinstance(delta, SparseDelta):
            found.update({f"{host_name}.{p}": getattr(host, p) for p in delta.param_names})
    if not found:
        raise SelectionError(f"adapter {name!r} is not a selective adapter")
    return found


def install_masks(model: nn.Module, name: str, masks: dict[str, Mask]) -> None:
    """Give adapter `name` these masks (its values start at zero); a parameter not named gets none."""
    if name in get_registry(model).merged:
        raise SelectionError(f"adapter {name!r} is merged; unmerge it before changing its mask")
    missing = sorted(set(masks) - set(candidates(model, name)))
    if missing:
        raise MaskError(f"masks for parameters adapter {name!r} does not adapt: {missing[:5]}")
    for host_name, _, delta in adapter_deltas(model, name):
        if isinstance(delta, SparseDelta):
            delta.install(masks_of(host_name, masks))


class FisherSelected(SelectiveConfig):
    """Config fields of the methods whose mask is the top `fraction` of parameters by empirical Fisher."""

    fraction: Fraction = 0.005
    fisher: Literal["per_example", "per_batch"] = Field(
        "per_example", description="square each example's gradient (FishMask) or each batch's (Child-Tuning_D)")

    def fisher_batches(self, model: nn.Module, name: str, batches: Iterable[Any], loss_fn: LossFn) -> Iterable[Any]:
        """The batches the Fisher is computed on (Fish-Dip keeps only the hardest examples)."""
        return batches

    def training_steps(self, context: TrainingContext) -> list[TrainingStep]:
        """Choose the mask from the Fisher on a few training batches, before training: until then it has none."""
        select(context.model, context.adapter, context.batches, context.loss_fn)
        return []


def select(model: nn.Module, name: str, batches: Iterable[Any], loss_fn: LossFn | None = None) -> dict[str, Mask]:
    """Choose the mask of a Fisher-selected adapter from a few batches and install it; returns the masks.

    `loss_fn(model, batch)` is the batch's mean negative log-likelihood (default: cross-entropy of
    `model(**inputs)` logits for batches `(inputs, labels)`).
    """
    masks = fisher_masks(model, name, batches, loss_fn)
    install_masks(model, name, masks)
    return masks


def fisher_masks(model: nn.Module, name: str, batches: Iterable[Any], loss_fn: LossFn | None = None) -> dict[str, Mask]:
    """The masks a Fisher-selected adapter's config picks from these batches (nothing is installed)."""
    config = get_registry(model).require(name)
    if not isinstance(config, FisherSelected):
        raise SelectionError(f"adapter {name!r} ({config.method}) chooses its parameters when attached; "
                             "select() is for Fisher-selected methods (FishMask, Fish-Dip, Child-Tuning_D)")
    loss_fn = loss_fn or classification_nll
    scores = fisher_scores(model, name, config.fisher_batches(model, name, batches, loss_fn), loss_fn,
                           per_example=config.fisher == "per_example")
    return top_fraction(scores, config.fraction)


def classification_nll(model: nn.Module, batch: tuple[Any, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of a batch `(inputs, labels)`; inputs a dict of model kwargs or one tensor."""
    inputs, labels = batch
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return F.cross_entropy(getattr(out, "logits", out), labels)


def split_rows(batch: Any) -> Iterator[Any]:
    """Each example of a batch (tensors, or dicts / tuples / lists of them) as a batch of one."""
    size = _batch_size(batch)
    for row in range(size):
        yield _take(batch, slice(row, row + 1))


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        size = _batch_size(item)
        if size >= 0:
            return size
    return -1


def _take(batch: Any, rows: slice) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[rows]
    if isinstance(batch, dict):
        return {k: _take(v, rows) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(v, rows) for v in batch)
    return batch


def fisher_scores(model: nn.Module, name: str, batches: Iterable[Any], loss_fn: LossFn | None = None,
                  per_example: bool = True) -> Scores:
    """Empirical Fisher of every candidate parameter of adapter `name`, in eval mode (no dropout).

    per_example: mean over examples of the squared gradient of each example's log-likelihood;
    otherwise: mean over batches of the squared gradient of each batch's mean log-likelihood.
    An unselected adapter adds nothing (scores at the base weights); a selected one applies its change
    (scores at the current weights, as Fish-Dip's re-selection needs). Its task-head copy is used.
    """
    loss_fn = loss_fn or classification_nll
    params = candidates(model, name)
    fisher = {key: torch.zeros_like(p, dtype=torch.float32) for key, p in params.items()}
    count = 0
    with scoring(model, name, params.values()):
        for batch in batches:
            for unit in (split_rows(batch) if per_example else [batch]):
                grads = torch.autograd.grad(loss_fn(model, unit), list(params.values()), allow_unused=True)
                for total, grad in zip(fisher.values(), grads):
                    if grad is not None:
                        total.addcmul_(grad.float(), grad.float())
                count += 1
    if count == 0:
        raise NoDataError(f"Fisher scores for adapter {name!r} need at least one example; the batches were empty")
    return {key: total / count for key, total in fisher.items()}


@contextmanager
def scoring(model: nn.Module, name: str, params: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Run adapter `name` alone in eval mode (unselected deltas silent) with gradients on the given base weights."""
    registry = get_registry(model)
    if name in registry.merged or registry.plan is not None:
        raise SelectionError(f"cannot score adapter {name!r} while it is merged or inside peftkit.routed")
    deltas = [d for _, _, d in adapter_deltas(model, name) if isinstance(d, SparseDelta)]
    params = list(params)
    flags = [p.requires_grad for p in params]
    active, training = registry.active, model.training
    registry.active = [name]
    model.eval()
    for p in params:
        p.requires_grad_(True)
    for delta in deltas:
        delta.scoring = True
    try:
        yield
    finally:
        for delta in deltas:
            delta.scoring = False
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        registry.active = active
        model.train(training)
