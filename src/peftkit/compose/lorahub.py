"""LoRAHub (Huang et al., 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition",
arXiv:2307.13269): K trained LoRAs, a few examples of a new task, and a gradient-free search for the weights w of
one composed LoRA:

    A = Σ_i w_i A_i,   B = Σ_i w_i s_i B_i   (so ΔW = B A = Σ_i Σ_j w_i w_j s_i B_i A_j: cross terms included)
    w* = argmin_{w ∈ [−bound, bound]^K}  L(w) + λ Σ_i |w_i|       L(w): the mean loss on the examples

The composition is the paper's (its code multiplies every LoRA tensor, A and B alike, by w_i and sums); with
`mixing="deltas"` it is instead the exact weighted sum ΔW = Σ_i w_i ΔW_i: a LoRA of rank Σ r_i for plain LoRAs
(`merge_adapters`' "cat"), a dense weight change for other LoRA variants (LoHa, LoKr, VeRA, ...: "linear" with
store="dense"). The search starts at w = 0, as the paper's, and runs an existing optimiser: Nevergrad's NGOpt (the
paper's choice) or CMA-ES from `cma`, both seeded. λ defaults to 0.05 / K: the paper's 0.05 · mean_i |w_i|. The loss is
scored in eval mode without gradients, so it is a deterministic function of w; the result is the best candidate
evaluated. A trained copy of a head (`modules_to_save`) is composed as base + Σ_i w_i (copy_i − base).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .. import api
from ..core.delta import Delta
from ..methods.selective.selection import LossFn, classification_nll
from ..models import require_extra
from . import merge_math
from .merge import AdapterMerge, _set_lora
from .sources import AdapterMergeError, read_source

Optimizer = Literal["ngopt", "cma"]
Mixing = Literal["factors", "deltas"]
PAPER_L1 = 0.05  # the paper's λ on the mean of |w_i|


class FactorMix(AdapterMerge):
    """LoRAHub's composition of plain LoRAs of one shape: A = Σ w_i A_i, B = Σ w_i s_i B_i (the result's s is 1)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__(model, names, "linear")  # linear's checks: plain LoRAs on the same modules, same ranks
        if self.form != "linear":
            raise AdapterMergeError(f"LoRAHub mixes LoRA factors; {self.names} are not all plain LoRAs: use "
                                    "mixing='deltas' (the weighted sum of their weight changes) for other LoRA "
                                    "variants")

    def _fill_delta(self, host_name: str, host: nn.Module, target: Delta, weights: list[float],
                    generator: torch.Generator) -> None:
        deltas, own_weights = self._contributions(host_name, weights)
        a, b = merge_math.linear_factors([d.lora_A.detach() for d in deltas], [d.lora_B.detach() for d in deltas],
                                         own_weights, [w * d.scaling for d, w in zip(deltas, own_weights)])
        _set_lora(target, a, b)


@dataclass(frozen=True)
class Candidate:
    """One evaluated weight vector: its loss on the examples and its L1 penalty λ Σ|w_i|."""

    weights: tuple[float, ...]
    loss: float
    penalty: float

    @property
    def objective(self) -> float:
        return self.loss + self.penalty


@dataclass
class LoRAHubResult:
    """The search's outcome: the best weights (by adapter), their candidate, every candidate in order, and the
    adapter holding the composition with the best weights."""

    weights: dict[str, float]
    best: Candidate
    history: list[Candidate]
    adapter: str


def lorahub(model: nn.Module, names: Sequence[str], examples: Sequence[Any], loss_fn: LossFn | None = None, *,
            budget: int = 40, seed: int = 0, l1: float | None = None, bound: float = 1.5,
            optimizer: Optimizer = "ngopt", mixing: Mixing = "factors", new_name: str = "lorahub") -> LoRAHubResult:
    """Search the weights of a composition of the attached LoRAs `names` (module docstring) with `budget` loss
    evaluations, and leave the composition with the best weights attached and active as `new_name`.

    `examples`: batches of the new task; `loss_fn(model, batch)` their mean loss (default: cross-entropy of a batch
    `(inputs, labels)`); L(w) is the mean over the batches. `l1`: λ (default 0.05 / K). `bound`: each weight's range
    [−bound, bound] (the paper's 1.5). The same seed gives the same candidates and result."""
    names, examples = list(names), list(examples)
    _check_search(names, examples, budget, bound, l1, optimizer, mixing)
    penalty_weight = PAPER_L1 / len(names) if l1 is None else l1
    merge = FactorMix(model, names) if mixing == "factors" else _weighted_sum(model, names)
    loss_fn = loss_fn or classification_nll
    history: list[Candidate] = []

    def objective(weights: np.ndarray) -> float:
        values = tuple(float(w) for w in weights)
        merge.write(new_name, values)
        loss = _mean_loss(model, examples, loss_fn)
        if not math.isfinite(loss):
            raise ValueError(f"the loss on the examples is {loss} at weights {dict(zip(names, values))}")
        history.append(Candidate(values, loss, penalty_weight * sum(abs(w) for w in values)))
        return history[-1].objective

    merge.attach(new_name, [0.0] * len(names))
    try:
        _SEARCHES[optimizer](objective, len(names), budget, bound, seed)
        best = min(history, key=lambda c: c.objective)
        merge.write(new_name, best.weights)
    except BaseException:
        api.remove(model, new_name)
        raise
    return LoRAHubResult(dict(zip(names, best.weights)), best, history, new_name)


def _check_search(names: list[str], examples: Sequence[Any], budget: int, bound: float, l1: float | None,
                  optimizer: str, mixing: str) -> None:
    if not examples:
        raise ValueError("LoRAHub scores candidates on examples of the new task: pass at least one batch")
    if budget < 1:
        raise ValueError(f"budget is the number of loss evaluations: at least 1, got {budget}")
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a positive number (weights range over [-bound, bound]), got {bound}")
    if l1 is not None and not (math.isfinite(l1) and l1 >= 0):
        raise ValueError(f"l1 (λ of the penalty λ·Σ|w_i|) must be a number >= 0, got {l1}")
    if optimizer not in _SEARCHES:
        raise ValueError(f"unknown optimizer {optimizer!r}: use one of {sorted(_SEARCHES)}")
    if mixing not in ("factors", "deltas"):
        raise ValueError(f"unknown mixing {mixing!r}: 'factors' (the paper's A = Σ w_i A_i, B = Σ w_i s_i B_i) or "
                         "'deltas' (ΔW = Σ w_i ΔW_i)")
    if len(names) < 2:
        raise ValueError(f"LoRAHub composes two or more LoRAs, got {names}")


def _weighted_sum(model: nn.Module, names: list[str]) -> AdapterMerge:
    """ΔW = Σ_i w_i ΔW_i exactly: stacked factors for plain LoRAs (rank Σ r_i), else each module's dense change."""
    if all(read_source(model, name).plain_lora for name in names):
        return AdapterMerge(model, names, "cat")
    return AdapterMerge(model, names, "linear", store="dense")


@torch.no_grad()
def _mean_loss(model: nn.Module, examples: Sequence[Any], loss_fn: LossFn) -> float:
    """The mean of `loss_fn` over the example batches, in eval mode (no dropout: a deterministic function of w)."""
    was_training = model.training
    model.eval()
    try:
        return sum(float(loss_fn(model, batch)) for batch in examples) / len(examples)
    finally:
        model.train(was_training)


def _ngopt(objective: Callable[[np.ndarray], float], dim: int, budget: int, bound: float, seed: int) -> None:
    require_extra("nevergrad", "search")
    import nevergrad as ng

    weights = ng.p.Array(init=np.zeros(dim), lower=-bound, upper=bound)
    weights.random_state = np.random.RandomState(seed)
    search = ng.optimizers.NGOpt(parametrization=weights, budget=budget)
    with warnings.catch_warnings():  # NGOpt's COBYLA passes scipy settings it corrects itself: not ours
        warnings.filterwarnings("ignore", message="COBYLA: Invalid", category=UserWarning)
        for _ in range(budget):
            candidate = search.ask()
            search.tell(candidate, objective(candidate.value))


def _cma(objective: Callable[[np.ndarray], float], dim: int, budget: int, bound: float, seed: int) -> None:
    """CMA-ES from w = 0 with step size bound / 3, its normal draws from its own seeded generator (`cma`'s `seed`
    option would reseed numpy's global one). A last generation the budget cuts short is scored, not told."""
    require_extra("cma", "search")
    import cma

    options = {"bounds": [-bound, bound], "randn": np.random.RandomState(seed).randn, "seed": np.nan,
               "verbose": -9, "verb_log": 0, "verb_disp": 0}
    search = cma.CMAEvolutionStrategy(np.zeros(dim), bound / 3, options)
    spent = 0
    while spent < budget:
        population = search.ask()
        scores = [objective(w) for w in population[:budget - spent]]
        spent += len(scores)
        if len(scores) == len(population):
            search.tell(population, scores)


_SEARCHES: dict[str, Callable[..., None]] = {"ngopt": _ngopt, "cma": _cma}
