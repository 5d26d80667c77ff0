"""Merging adapters: a new adapter built from adapters already attached, with weights, by one of the formulas in
`merge_math` (linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune); no forward pass is run.

What each method computes depends on the adapters' family (every adapter of one merge is of one family):

- LoRA family (LoRA and the methods with a weight delta ΔW_i that adds to the output: AdaLoRA, DyLoRA, LoHa, VeRA ...):
  `linear` mixes the factors (PEFT's formula, cross terms included; plain LoRAs on the same modules with the same
  ranks only); `cat` stacks them (B A = Σ w_i ΔW_i exactly, rank Σ r_i; plain LoRA only); `svd` and the task-vector
  methods merge each module's dense ΔW_i and store the result as a LoRA of rank `rank` by truncated SVD (default:
  Σ_i r_i capped at min(out, in)), or, with `store="dense"` / `"sparse"`, as a `merged_diff` adapter.
- selective (BitFit, FishMask, ... : `ParamDiff` values): `linear` and the task-vector methods on each parameter's
  change ΔW_i (zero off its mask), stored as a `merged_diff` adapter on the non-zero entries (or dense blocks).
- (IA)³: the task vectors are the changes of the scaling vectors, τ_i = l_i − 1: l = 1 + merge(τ_1, ..., τ_K).
  With linear, l = 1 + Σ w_i (l_i − 1): to first order in τ, the product of the scalings Π l_i^{w_i} (applying them
  all); it is PEFT's Σ w_i l_i when Σ w_i = 1.

Trained copies of whole modules (`modules_to_save`, a task head) merge as task vectors too: copy = base + merge of
(copy_i − base), by the adapter method's own formula for the task-vector methods and by Σ w_i (copy_i − base) for
linear / cat / svd. An adapter without a copy of that module contributes 0.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from .. import api
from ..core.config import AdapterConfig, register_method, validation_message
from ..core.delta import Delta, ModuleCopy
from ..core.hosts import host_shape, to_host_layout
from ..core.merging import unfolded
from ..core.registry import adapter_deltas, get_registry
from ..methods.additive.ia3 import IA3
from ..methods.reparameterized.lora import LoRA, LoRADelta
from ..methods.selective.mask import Mask
from ..methods.selective.sparse import SelectiveConfig, SparseDelta
from . import merge_math
from .sources import AdapterMergeError, common_family, read_source
from .merge_math import SignMethod

MergeMethod = Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
_TRIMS, _DROPS, _ELECTS = ("ties", "magnitude_prune"), ("dare_linear", "dare_ties"), ("ties", "dare_ties")
_FACTOR_METHODS = ("linear", "cat")  # on plain LoRAs: computed on the factors, never on a dense ΔW


@register_method
class MergedDiff(SelectiveConfig):
    """A merged change of host weights and biases (`merge_adapters` with store="dense" or "sparse")."""

    method: ClassVar[str] = "merged_diff"
    not_trained_by_run: ClassVar[str | None] = "it is the result of a merge: make it with peftkit.merge_adapters(...)"


class MergeOptions(BaseModel):
    """How to merge: the method and the options it takes (an option the method does not use is an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: MergeMethod = "linear"
    rank: int | None = Field(None, gt=0, description="rank of the LoRA the result is stored as (SVD)")
    density: float | None = Field(None, gt=0, le=1, description="share of each task vector kept (trim / DARE)")
    seed: int | None = Field(None, description="DARE's random masks (default 0)")
    sign_method: SignMethod | None = Field(None, description="TIES' sign election: total mass (default) or count")
    store: Literal["lora", "dense", "sparse"] | None = Field(
        None, description="the form of a dense result: a LoRA by SVD (default for LoRA), a dense or a sparse change")

    @model_validator(mode="after")
    def _options_fit_method(self) -> "MergeOptions":
        takes = {"density": self.method in _TRIMS + _DROPS, "seed": self.method in _DROPS,
                 "sign_method": self.method in _ELECTS}
        for option, used in takes.items():
            if getattr(self, option) is not None and not used:
                raise ValueError(f"{self.method} takes no {option}")
        if takes["density"] and self.density is None:
            raise ValueError(f"{self.method} needs a density: the share of each task vector to keep, in (0, 1]")
        return self


def _check_weights(names: Sequence[str], weights: Sequence[float]) -> list[float]:
    if len(weights) != len(names):
        raise AdapterMergeError(f"{len(weights)} weights for {len(names)} adapters {list(names)}")
    bad = [f"{n}: {w!r}" for n, w in zip(names, weights) if not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise AdapterMergeError(f"merge weights must be finite numbers; got {', '.join(bad)}")
    return [float(w) for w in weights]


class AdapterMerge:
    """A merge of fixed attached adapters by one method, reusable with new weights: `attach` adds the merged adapter,
    `write` refills one it attached (same shapes, no new modules): LoRAHub's search calls it once per candidate."""

    def __init__(self, model: nn.Module, names: Sequence[str], method: MergeMethod = "linear", **options: object):
        self.model, self.names = model, list(names)
        try:
            self.options = MergeOptions(method=method, **options)
        except ValidationError as err:
            raise AdapterMergeError(f"merge options: {validation_message(err)}") from None
        if not self.names or len(set(self.names)) != len(self.names):
            raise AdapterMergeError(f"merging needs one or more distinct adapter names, got {self.names}")
        self.sources = [read_source(model, name) for name in self.names]
        self.family = common_family(self.sources)
        self.hosts = list(dict.fromkeys(h for s in self.sources for h in s.deltas))
        self.copied = list(dict.fromkeys(h for s in self.sources for h in s.copies))
        clash = sorted(set(self.hosts) & set(self.copied))
        if clash:
            raise AdapterMergeError(f"modules {clash} are adapted by some of {self.names} and copied whole by others")
        self.form = self._form()
        self.ranks = self._ranks() if self.form in ("linear", "cat", "lora") else {}
        self.config = self._config()

    # --- what the result is ------------------------------------------------------------------------------------

    def _form(self) -> str:
        """"linear" / "cat" (LoRA factors), "lora" (a dense merge stored by SVD), "ia3", "dense" or "sparse"."""
        method, store, rank = self.options.method, self.options.store, self.options.rank
        if method in _FACTOR_METHODS and self.family == "lora" and all(s.plain_lora for s in self.sources):
            if store is not None or rank is not None:
                raise AdapterMergeError(f"{method} keeps the LoRA factors (the adapters set the rank): it takes no "
                                        "store or rank; svd gives a chosen rank")
            if method == "linear":
                self._check_same_factors()
            return method
        if method == "cat":
            others = [f"{s.name!r} ({s.method})" for s in self.sources if not s.plain_lora]
            instead = "svd" if self.family == "lora" else "linear (the exact weighted sum of their changes)"
            raise AdapterMergeError(f"cat stacks plain LoRA factors; {', '.join(others)} have none: use {instead}")
        if method == "svd" and self.family != "lora":
            raise AdapterMergeError(f"svd re-factors a weight change into LoRA factors; {self.family} adapters have "
                                    "none: use linear")
        if self.family == "ia3":
            if store is not None or rank is not None:
                raise AdapterMergeError("(IA)³ adapters merge into (IA)³ vectors: no store or rank")
            return "ia3"
        chosen = store or ("lora" if self.family == "lora" else "sparse")
        if chosen == "lora" and self.family != "lora":
            raise AdapterMergeError("selective changes are sparse, not low-rank: store them dense or sparse")
        if method == "svd" and chosen != "lora":
            raise AdapterMergeError(f"svd stores a LoRA; for a {chosen} weighted sum use linear with store={chosen!r}")
        if rank is not None and chosen != "lora":
            raise AdapterMergeError(f"rank is the rank of a LoRA result; store={chosen!r} has none")
        return chosen

    def _check_same_factors(self) -> None:
        """PEFT's linear adds A's to A's and B's to B's: every adapter needs the same modules and ranks."""
        first = self.sources[0]
        shape = {h: tuple(d.lora_A.shape) for h, d in first.deltas.items()}
        for other in self.sources[1:]:
            theirs = {h: tuple(d.lora_A.shape) for h, d in other.deltas.items()}
            if theirs != shape:
                where = sorted(set(shape) ^ set(theirs)) or sorted(h for h in shape if shape[h] != theirs[h])
                raise AdapterMergeError(
                    f"linear mixes the LoRA factors of {first.name!r} and {other.name!r}, which differ at {where[:3]} "
                    "(modules or ranks): use cat (the exact weighted sum) or svd")

    def _ranks(self) -> dict[str, int]:
        """The rank of the result on each module: the adapters' (linear), their sum (cat), `rank` or the sum of the
        adapters' ranks capped at min(out, in) (SVD)."""
        ranks = {}
        for host_name in self.hosts:
            host = self.model.get_submodule(host_name)
            shape = host_shape(host)
            limit = min(shape.out_features, shape.in_features * math.prod(shape.kernel_size or (1,)))
            own = [_rank_bound(s.deltas[host_name], limit) for s in self.sources if host_name in s.deltas]
            if self.form == "linear":
                ranks[host_name] = own[0]
            elif self.form == "cat":
                ranks[host_name] = sum(own)
                if ranks[host_name] > limit:
                    raise AdapterMergeError(f"cat gives rank {sum(own)} on {host_name!r}, above its min(out, in) = "
                                            f"{limit}: use svd with a rank up to {limit}")
            elif self.options.rank is not None and self.options.rank > limit:
                raise AdapterMergeError(f"rank {self.options.rank} exceeds min(out, in) = {limit} of {host_name!r}")
            else:
                ranks[host_name] = self.options.rank or min(sum(own), limit)
        return ranks

    def _config(self) -> AdapterConfig:
        saved = {"targets": self.hosts, "modules_to_save": self.copied}
        if self.form in ("linear", "cat", "lora"):
            common = Counter(self.ranks.values()).most_common(1)[0][0]
            pattern = {re.escape(h): r for h, r in self.ranks.items() if r != common}
            return LoRA(r=common, alpha=common, rank_pattern=pattern, **saved)  # s = 1 on most modules; B holds the rest
        if self.form == "ia3":
            feedforward = [h for h in self.hosts if any(s.deltas.get(h) is not None and s.deltas[h].feedforward
                                                         for s in self.sources)]
            for s in self.sources:
                for h, d in s.deltas.items():
                    if d.feedforward != (h in feedforward):
                        raise AdapterMergeError(f"(IA)³ adapters scale {h!r} on different sides (input vs output), "
                                                f"{s.name!r} among them: such scalings do not merge into one vector")
            return IA3(feedforward=feedforward or None, **saved)
        return MergedDiff(**saved)

    # --- attaching and filling ---------------------------------------------------------------------------------

    def attach(self, new_name: str, weights: Sequence[float], activate: bool = True) -> nn.Module:
        """Attach the merged adapter as `new_name` with these weights (one per source, in order)."""
        weights = _check_weights(self.names, weights)
        api.attach(self.model, self.config, name=new_name, activate=False)
        try:
            self._fill(new_name, weights)
        except BaseException:
            api.remove(self.model, new_name)
            raise
        if activate:
            api.activate_new(self.model, new_name)
        return self.model

    def write(self, name: str, weights: Sequence[float]) -> None:
        """Refill adapter `name`, attached by this merge, with new weights (in place: no module is made)."""
        registry = get_registry(self.model)
        if registry.require(name) != self.config:
            raise AdapterMergeError(f"adapter {name!r} was not made by this merge (its config differs)")
        if name in registry.merged:
            raise AdapterMergeError(f"adapter {name!r} is merged into the base weights; unmerge it before rewriting it")
        self._fill(name, _check_weights(self.names, weights))

    @torch.no_grad()
    def _fill(self, name: str, weights: list[float]) -> None:
        registry = get_registry(self.model)
        generator = torch.Generator().manual_seed(self.options.seed or 0)
        with unfolded(self.model, registry, [""]):  # merged sources and copies read as trained, not as folded
            for host_name, host, delta in adapter_deltas(self.model, name):
                if isinstance(delta, ModuleCopy):
                    self._fill_copy(host_name, host, delta, weights, generator)
                else:
                    self._fill_delta(host_name, host, delta, weights, generator)

    def _contributions(self, host_name: str, weights: list[float]) -> tuple[list[Delta], list[float]]:
        pairs = [(s.deltas[host_name], w) for s, w in zip(self.sources, weights) if host_name in s.deltas]
        return [d for d, _ in pairs], [w for _, w in pairs]

    def _combine(self, tensors: list[torch.Tensor], weights: list[float], generator: torch.Generator) -> torch.Tensor:
        """The merge of dense task vectors by this merge's method (svd and cat: their weighted sum, as linear)."""
        method = self.options.method if self.options.method not in ("svd", "cat") else "linear"
        return merge_math.combine(method, tensors, weights, self.options.density or 1.0, generator,
                                  self.options.sign_method or "total")

    def _fill_delta(self, host_name: str, host: nn.Module, target: Delta, weights: list[float],
                    generator: torch.Generator) -> None:
        deltas, own_weights = self._contributions(host_name, weights)
        if self.form in _FACTOR_METHODS:
            a_factors, b_factors = [d.lora_A.detach() for d in deltas], [d.lora_B.detach() for d in deltas]
            coefficients = [w * d.scaling for d, w in zip(deltas, own_weights)]
            a, b = (merge_math.linear_factors(a_factors, b_factors, *merge_math.peft_factor_weights(coefficients))
                    if self.form == "linear" else merge_math.concatenated(a_factors, b_factors, coefficients))
            _set_lora(target, a, b)
        elif self.form == "lora" and self.options.method == "svd" and all(type(d) is LoRADelta for d in deltas):
            stacked = merge_math.concatenated([d.lora_A.detach() for d in deltas], [d.lora_B.detach() for d in deltas],
                                              [w * d.scaling for d, w in zip(deltas, own_weights)])
            _set_lora(target, *merge_math.factored_svd(*stacked, self.ranks[host_name]))  # Σ w_i ΔW_i = B A, rank Σ r_i
        elif self.form == "lora":
            dense = self._combine([d.delta_weight().float() for d in deltas], own_weights, generator)
            _set_lora(target, *merge_math.truncated_svd(dense, self.ranks[host_name]))
        elif self.form == "ia3":
            merged = self._combine([d.ia3_l.detach().float() - 1 for d in deltas], own_weights, generator)
            target.ia3_l.copy_(1 + merged)
        else:
            self._fill_diff(host, target, deltas, own_weights, generator)

    def _fill_diff(self, host: nn.Module, target: SparseDelta, deltas: list[Delta], weights: list[float],
                   generator: torch.Generator) -> None:
        """A dense or sparse change per parameter, in the host's own layout."""
        changes: dict[str, list[torch.Tensor]] = {}
        for delta in deltas:
            own = ({"weight": to_host_layout(host, delta.delta_weight().float())} if self.family == "lora" else
                   {param: diff.dense().detach().float() for param, diff in delta.diffs() if diff.size()})
            for param in target.param_names:
                changes.setdefault(param, []).append(own.get(param, torch.zeros_like(getattr(host, param), dtype=torch.float32)))
        merged = {param: self._combine(tensors, weights, generator) for param, tensors in changes.items()
                  if any(bool(t.any()) for t in tensors)}
        masks = {param: Mask.whole() if self.form == "dense" else Mask.elements(change.flatten().nonzero().flatten())
                 for param, change in merged.items()}
        target.install(masks)
        for param, change in merged.items():
            diff = getattr(target, param)
            diff.values.copy_(diff.pick(change))

    def _fill_copy(self, host_name: str, host: nn.Module, target: ModuleCopy, weights: list[float],
                   generator: torch.Generator) -> None:
        """copy = base + merge of (copy_i − base) per parameter (0 for an adapter without a copy of this module)."""
        for param_name, param in target.module.named_parameters():
            base = host.get_parameter(param_name).detach().float()
            changes = [s.copies[host_name][1].module.get_parameter(param_name).detach().float() - base
                       if host_name in s.copies else torch.zeros_like(base) for s in self.sources]
            param.copy_(base + self._combine(changes, weights, generator))


def _rank_bound(delta: Delta, limit: int) -> int:
    """An upper bound of rank ΔW: a LoRA's r, else the module's min(out, in)."""
    return delta.lora_A.shape[0] if isinstance(delta, LoRADelta) else limit


def _set_lora(target: LoRADelta, a: torch.Tensor, b: torch.Tensor) -> None:
    """Factors whose product is the merged ΔW: B is divided by the result's scaling s, which multiplies it back."""
    target.lora_A.copy_(a)
    target.lora_B.copy_(b / target.scaling)


def merge_adapters(model: nn.Module, weights: Mapping[str, float], method: MergeMethod = "linear",
                   new_name: str = "merged", activate: bool = True, **options: object) -> nn.Module:
    """Attach adapter `new_name` merged from attached adapters {name: weight} by `method` (see this module and
    `merge_math` for each formula). Options: rank (svd and LoRA results of task-vector methods), density (ties,
    dare_*, magnitude_prune), seed (dare_*), sign_method (ties, dare_ties: "total" or "frequency"), store ("lora",
    "dense", "sparse"). A mix that cannot be merged raises `AdapterMergeError` before anything is attached."""
    return AdapterMerge(model, list(weights), method, **options).attach(new_name, list(weights.values()), activate)
