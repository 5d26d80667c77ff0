"""Per-layer-group designs (Chen et al., 2023, arXiv:2301.01821, "Parameter-efficient fine-tuning design spaces"):
the layers are split into consecutive groups and each group gets its own methods and settings.

    layers 0 … L−1 = G_1 ∪ … ∪ G_k (consecutive),  |G_j| ∝ w_j
    spindle w_j = min(j, k + 1 − j)            (1, 2, 2, 1) at k = 4, (1, 2, 3, 2, 1) at k = 5
    bottleneck w_j = max(spindle) + 1 − spindle_j   (2, 1, 1, 2) at k = 4, (3, 2, 1, 2, 3) at k = 5
    uniform (1, …, 1)   increasing (1, 2, …, k)   decreasing (k, …, 1)

Spindle is the paper's pattern of fewer layers at the ends and more in the middle, for any k: rising one step a
group toward the middle (as `increasing` does) and falling after it; bottleneck is its mirror. S4's search found
spindle grouping best; its S4 model puts different mixes of adapters, LoRA, prefixes and BitFit in the four groups.
Here each group's parts are ordinary method configs whose targets are narrowed to the group's layers (a layer is the
first number in a module's name: `encoder.layer.3.…`, `model.layers.3.…`); parts that act on every layer at once (a
prefix, whose cache holds all layers) go in `shared`. It is a `Compose` underneath.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_serializer, field_validator, model_validator
from torch import nn

from ...core.config import AdapterConfig, register_method
from ..additive.bottleneck import Bottleneck
from ..additive.prefix import PrefixTuning
from ..reparameterized.lora import LoRA
from ..selective.bitfit import BitFit
from .compose import HybridConfig, Placed, check_parts, parse_parts
from .unipelt import QUERY_VALUE

Shape = Literal["spindle", "uniform", "increasing", "decreasing", "bottleneck"]


def group_weights(shape: Shape, groups: int) -> list[int]:
    """The relative group sizes w_j of a grouping pattern (module docstring): spindle rises toward the middle and
    falls after it, bottleneck the reverse."""
    spindle = [min(j + 1, groups - j) for j in range(groups)]
    return {"spindle": spindle, "uniform": [1] * groups, "increasing": list(range(1, groups + 1)),
            "decreasing": list(range(groups, 0, -1)),
            "bottleneck": [max(spindle) + 1 - w for w in spindle]}[shape]


def group_sizes(shape: Shape, groups: int, layers: int) -> list[int]:
    """Layers per group: L·w_j / Σw rounded down, the layers left given by largest remainder; at least one each."""
    if layers < groups:
        raise ValueError(f"{groups} layer groups need at least {groups} layers; the model has {layers}")
    weights = group_weights(shape, groups)
    exact = [layers * w / sum(weights) for w in weights]
    sizes = [max(1, int(e)) for e in exact]
    while sum(sizes) > layers:  # groups raised to one layer took it from the largest
        sizes[sizes.index(max(sizes))] -= 1
    by_remainder = sorted(range(groups), key=lambda j: (-(exact[j] - int(exact[j])), j))
    for j in by_remainder[:layers - sum(sizes)]:
        sizes[j] += 1
    return sizes


def num_layers(model: nn.Module) -> int:
    """The model's transformer layer count, from its config."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not isinstance(count, int):
        raise ValueError(f"{type(model).__name__} has no layer count in its config (num_hidden_layers); give the "
                         "layer groups' `sizes` explicitly")
    return count


@register_method
class LayerGroups(HybridConfig):
    """A per-layer-group design: a grouping pattern (or explicit sizes), each group's parts, and shared parts."""

    method: ClassVar[str] = "layer_groups"
    groups: list[list[AdapterConfig]] = Field(description="each group's parts, from the first layers to the last")
    shape: Shape = Field("spindle", description="how many layers each group gets (S4: spindle)")
    sizes: list[int] | None = Field(None, description="layers per group, overriding `shape` (must sum to the layers)")
    shared: list[AdapterConfig] = Field([], description="parts on the whole model (a prefix: all layers at once)")

    @field_validator("groups", mode="before")
    @classmethod
    def _parse_groups(cls, value: Any) -> Any:
        return [parse_parts(group) for group in value] if isinstance(value, (list, tuple)) else value

    @field_validator("shared", mode="before")
    @classmethod
    def _parse_shared(cls, value: Any) -> Any:
        return parse_parts(value)

    @model_validator(mode="after")
    def _check(self) -> "LayerGroups":
        if not self.groups:
            raise ValueError("groups: a design needs at least one layer group")
        for j, group in enumerate(self.groups):
            check_parts(group, f"groups[{j}]")
        check_parts(self.shared, "shared")
        if not any(self.groups) and not self.shared:
            raise ValueError("groups: every group is empty and nothing is shared")
        if self.sizes is not None and (len(self.sizes) != len(self.groups) or min(self.sizes) < 1):
            raise ValueError(f"sizes {self.sizes} must give each of the {len(self.groups)} groups at least one layer")
        return self

    @field_serializer("groups")
    def _dump_groups(self, groups: list[list[AdapterConfig]]) -> list[list[dict[str, Any]]]:
        return [[part.to_dict() for part in group] for group in groups]

    @field_serializer("shared")
    def _dump_shared(self, shared: list[AdapterConfig]) -> list[dict[str, Any]]:
        return [part.to_dict() for part in shared]

    def layer_ranges(self, model: nn.Module) -> list[range]:
        """Each group's layers on `model`."""
        layers = num_layers(model)
        sizes = self.sizes or group_sizes(self.shape, len(self.groups), layers)
        if sum(sizes) != layers:
            raise ValueError(f"sizes {sizes} cover {sum(sizes)} layers; the model has {layers}")
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        return [range(start, start + size) for start, size in zip(starts, sizes)]

    def placed_parts(self, model: nn.Module) -> list[Placed]:
        gated = self.gates == "learned"
        placed = [Placed(part, gated, frozenset(layers))
                  for group, layers in zip(self.groups, self.layer_ranges(model)) for part in group]
        return placed + [Placed(part, gated) for part in self.shared]

    def saved_config(self) -> "LayerGroups":
        return self.model_copy(update={"groups": [[p.saved_config() for p in group] for group in self.groups],
                                       "shared": [p.saved_config() for p in self.shared]})


def s4_model(attention: str | list[str] = QUERY_VALUE, r: int = 8, bottleneck: int = 32,
             num_virtual_tokens: int = 10) -> LayerGroups:
    """Chen et al.'s S4 model: four spindle groups, G1 (adapter, LoRA), G2 (adapter, prefix), G3 (adapter, prefix,
    BitFit), G4 (prefix, BitFit, LoRA). Adapters are scaled parallel ones beside the FFN, LoRA and BitFit act on the
    `attention` projections (BitFit needs biases: BERT-style models). The prefix writes every layer at once, so here
    it is shared by all four groups (S4 leaves it out of G1)."""
    adapter = Bottleneck.preset("parallel", bottleneck=bottleneck)
    lora, bitfit = LoRA(r=r, alpha=2.0 * r, targets=attention), BitFit(targets=attention)
    return LayerGroups(shape="spindle", groups=[[adapter, lora], [adapter], [adapter, bitfit], [bitfit, lora]],
                       shared=[PrefixTuning(num_virtual_tokens=num_virtual_tokens)])
