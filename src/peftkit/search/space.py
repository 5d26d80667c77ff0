"""The design space of `peftkit search` (the `search:` section of its config) and the designs drawn from it.

A design, after Chen et al.'s design spaces (arXiv:2301.01821): the layers split into k consecutive groups (k from
`groups`, their sizes by a `shape`), each group one method or none at a searched size, and a prefix shared by every
layer:

    group method ∈ {none, lora (rank r), ia3, bottleneck (width b, placement pfeiffer | houlsby | parallel)}
    prefix length ∈ prefix_length (0: no prefix)

It is written as the plain method when one method covers every layer, else as a `layer_groups` config (the prefix
in `shared`), so `peftkit train` runs the chosen design as it is.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, ValidationError, field_validator, model_validator

from ..core.config import AdapterConfig, validation_message
from ..methods.additive.bottleneck import PRESETS, Bottleneck
from ..methods.additive.ia3 import IA3
from ..methods.additive.prefix import PrefixTuning
from ..methods.hybrid.layer_groups import LayerGroups, Shape, group_sizes
from ..methods.hybrid.unipelt import QUERY_VALUE
from ..methods.reparameterized.lora import LoRA
from ..train.config import _Section

GROUP_METHODS = ("none", "lora", "ia3", "bottleneck")
Placement = Literal["pfeiffer", "houlsby", "parallel"]  # Bottleneck's presets: after the FFN, after both, beside it
FFN_OUT = PRESETS["pfeiffer"]["targets"]
# Each part's fixed fields, for BERT- and Llama-style layers; `search.parts` replaces or adds fields.
PART_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"targets": QUERY_VALUE},  # alpha = 2r unless given
    "ia3": {"targets": rf".*\.(key|value|k_proj|v_proj)|{FFN_OUT}", "feedforward": FFN_OUT},
    "bottleneck": {},  # the placement's preset gives the targets
    "prefix_tuning": {},
}
SEARCHED = {"lora": ("r",), "ia3": (), "bottleneck": ("bottleneck", "placement", "preset"),
            "prefix_tuning": ("num_virtual_tokens",)}


class SearchError(ValueError):
    """A search that cannot run: a bad space, a budget no design meets, an output folder of another search."""


class SearchSection(_Section):
    """What `peftkit search` explores and how long; every key has a default."""

    trials: int = Field(20, ge=1)  # designs trained (draws over the budget, empty or drawn before do not count)
    budget: int | None = Field(None, ge=1)  # most trainable parameters a candidate may have (task head included)
    seed: int = 0  # the sampler's; training uses the config's `seed`
    groups: list[PositiveInt] = [1, 2, 4]  # layer-group counts
    shapes: list[Shape] = ["spindle", "uniform", "increasing", "decreasing"]  # group sizes when k > 1
    methods: list[str] = list(GROUP_METHODS)  # each group's method
    lora_r: list[PositiveInt] = [2, 4, 8, 16]
    bottleneck_size: list[PositiveInt] = [8, 16, 32, 64]
    bottleneck_placement: list[Placement] = ["pfeiffer", "parallel"]
    prefix_length: list[NonNegativeInt] = [0, 5, 10, 20]  # a prefix shared by every layer; 0: none
    parts: dict[str, dict[str, Any]] = {}  # fixed fields per method, e.g. {lora: {alpha: 16, targets: [query]}}
    val_rows: int | None = Field(None, ge=1)  # held out of the training rows to score candidates; None: a fifth
    startup_trials: int = Field(8, ge=1)  # random designs before TPE models the scores

    @field_validator("groups", "shapes", "methods", "lora_r", "bottleneck_size", "bottleneck_placement",
                     "prefix_length")
    @classmethod
    def _choices(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise ValueError("give at least one choice")
        repeated = sorted({str(v) for v in value if value.count(v) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed twice")
        return value

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        for method in value:
            if method == "prefix_tuning":
                raise ValueError("prefix_tuning writes every layer at once, so it is no group's method: give its "
                                 "lengths in search.prefix_length (0: no prefix)")
            if method not in GROUP_METHODS:
                close = difflib.get_close_matches(str(method), GROUP_METHODS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown method {method!r}{hint}; a group's method is one of "
                                 f"{', '.join(GROUP_METHODS)}")
        return value

    @field_validator("parts")
    @classmethod
    def _fixed_fields(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for method, fields in value.items():
            if method not in PART_DEFAULTS:
                close = difflib.get_close_matches(str(method), PART_DEFAULTS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown method {method!r}{hint}; parts are {', '.join(PART_DEFAULTS)}")
            searched = [key for key in fields if key in SEARCHED[method]]
            if searched:
                raise ValueError(f"{method}: {', '.join(searched)} is searched (search.lora_r, bottleneck_size, "
                                 "bottleneck_placement, prefix_length), not fixed")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> "SearchSection":
        if set(self.methods) == {"none"} and set(self.prefix_length) == {0}:
            raise ValueError("every design of this space is empty: methods is only none and prefix_length only 0")
        for params in smallest_designs(self, max(self.groups)):  # each part's fixed fields, checked now
            try:
                build(params, self, max(self.groups))
            except ValidationError as err:
                raise ValueError(f"parts: {err.title}: {validation_message(err)}") from None
        return self

    def spec(self) -> dict[str, Any]:
        """What makes two searches the same search (`trials` may grow on a resume)."""
        return self.model_dump(mode="json", exclude={"trials"})


def group_part(params: dict[str, Any], j: int, space: SearchSection) -> tuple[AdapterConfig, str] | None:
    """Group j's part and its label, or None for no method."""
    method = params[f"group{j}"]
    fields = {**PART_DEFAULTS.get(method, {}), **space.parts.get(method, {})}
    if method == "lora":
        r = params[f"group{j}.lora_r"]
        return LoRA(**{"alpha": 2.0 * r, **fields, "r": r}), f"lora r{r}"
    if method == "ia3":
        return IA3(**fields), "ia3"
    if method == "bottleneck":
        size, placement = params[f"group{j}.bottleneck_size"], params[f"group{j}.bottleneck_placement"]
        return Bottleneck.preset(placement, **fields, bottleneck=size), f"bottleneck {size} {placement}"
    return None


@dataclass(frozen=True)
class Design:
    config: AdapterConfig
    label: str  # names every searched choice: two designs with one label are the same design


def build(params: dict[str, Any], space: SearchSection, layers: int) -> Design | None:
    """The design of a draw's choices on a model of `layers` layers; None when it adapts nothing."""
    k, length = params["groups"], params["prefix_length"]
    chosen = [group_part(params, j, space) for j in range(k)]
    shared = [PrefixTuning(**{**space.parts.get("prefix_tuning", {}), "num_virtual_tokens": length})] if length else []
    prefix = f" + prefix {length}" if length else ""
    labels = [part[1] if part else "none" for part in chosen]
    if all(part is None for part in chosen):
        return Design(shared[0], f"prefix {length}") if shared else None
    if len(set(labels)) == 1:  # one method on every layer: the grouping changes nothing
        part = chosen[0][0]
        return Design(LayerGroups(groups=[[part]], shape="uniform", shared=shared) if shared else part,
                      labels[0] + prefix)
    sizes = "-".join(map(str, group_sizes(params["shape"], k, layers)))  # shapes that size the groups alike: one label
    return Design(LayerGroups(groups=[[part[0]] if part else [] for part in chosen], shape=params["shape"],
                              shared=shared), f"groups {sizes}: {' / '.join(labels)}{prefix}")


def draw(trial: Any, space: SearchSection) -> dict[str, Any]:
    """One design's choices from an Optuna trial (define-by-run: a group's sizes only when its method takes them)."""
    k = trial.suggest_categorical("groups", space.groups)
    params = {"groups": k, "shape": trial.suggest_categorical("shape", space.shapes) if k > 1 else "uniform"}
    for j in range(k):
        method = params[f"group{j}"] = trial.suggest_categorical(f"group{j}", space.methods)
        if method == "lora":
            params[f"group{j}.lora_r"] = trial.suggest_categorical(f"group{j}.lora_r", space.lora_r)
        elif method == "bottleneck":
            params[f"group{j}.bottleneck_size"] = trial.suggest_categorical(f"group{j}.bottleneck_size",
                                                                            space.bottleneck_size)
            params[f"group{j}.bottleneck_placement"] = trial.suggest_categorical(f"group{j}.bottleneck_placement",
                                                                                 space.bottleneck_placement)
    params["prefix_length"] = trial.suggest_categorical("prefix_length", space.prefix_length)
    return params


def smallest_designs(space: SearchSection, layers: int) -> list[dict[str, Any]]:
    """Choices of the designs among which the space's fewest trainable parameters lie: each method at its smallest
    size (every placement), alone in the smallest group when a group may have none, else on every layer; a prefix
    alone. A method costs the same on every layer of a stack of equal layers, so no other design is smaller."""
    shortest = min(space.prefix_length)
    corner: dict[str, Any] = {"groups": 1, "shape": "uniform", "prefix_length": shortest}
    if "none" in space.methods:
        k, shape, j = min(((k, shape, j) for k in space.groups for shape in (space.shapes if k > 1 else ["uniform"])
                           for j, size in enumerate(group_sizes(shape, k, layers))),
                          key=lambda choice: group_sizes(choice[1], choice[0], layers)[choice[2]])
        corner = {**corner, "groups": k, "shape": shape, **{f"group{i}": "none" for i in range(k)}}
    else:
        j = 0
    designs = []
    for method in (m for m in space.methods if m != "none"):
        sizes = {"lora": [{"lora_r": min(space.lora_r)}], "ia3": [{}],
                 "bottleneck": [{"bottleneck_size": min(space.bottleneck_size), "bottleneck_placement": placement}
                                for placement in space.bottleneck_placement]}[method]
        designs += [{**corner, f"group{j}": method, **{f"group{j}.{key}": v for key, v in size.items()}}
                    for size in sizes]
    if "none" in space.methods and any(space.prefix_length):
        designs.append({**corner, "prefix_length": min(n for n in space.prefix_length if n)})
    return designs
