"""The adapters a merge reads: each one's deltas by module, its trained module copies, and its family (LoRA-family
weight changes, (IA)³ vectors or selective changes), or an error naming the adapter and why it cannot merge."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta, ModuleCopy, Placement
from ..core.registry import adapter_deltas, get_registry
from ..methods.additive.ia3 import IA3Delta
from ..methods.hybrid.compose import ComposedDelta
from ..methods.reparameterized.lora import LoRADelta
from ..methods.selective.sparse import SparseDelta

Family = Literal["lora", "selective", "ia3"]


class AdapterMergeError(ValueError):
    """Adapters that cannot be merged as asked: no common form, mismatched factors, a bad weight or option."""


@dataclass
class Source:
    """One attached adapter taking part: its deltas by host and its module copies by module."""

    name: str
    method: str
    family: Family
    deltas: dict[str, Delta] = field(default_factory=dict)
    copies: dict[str, tuple[nn.Module, ModuleCopy]] = field(default_factory=dict)

    @property
    def plain_lora(self) -> bool:
        return all(type(d) is LoRADelta for d in self.deltas.values())


def family_of(name: str, config: AdapterConfig, host_name: str, host: nn.Module, delta: Delta) -> Family:
    """Which merge family a delta belongs to, or an error naming the adapter and why it cannot merge."""
    def refuse(reason: str) -> AdapterMergeError:
        return AdapterMergeError(f"adapter {name!r} ({config.method}) cannot be merged: {reason}")

    if delta.rewrites_base:
        raise refuse("it rewrote the base weights (PiSSA); save it and load it back (a plain LoRA) to merge it")
    if getattr(config, "bias", "none") != "none":
        raise refuse(f"it trains biases (bias={config.bias!r}), which have no low-rank form")
    if isinstance(delta, IA3Delta):
        return "ia3"
    if isinstance(delta, SparseDelta):
        if not delta.selected:
            raise refuse(f"its delta on {host_name!r} has no mask yet (peftkit.select first)")
        return "selective"
    if type(delta).delta_weight is not Delta.delta_weight and delta.placement is Placement.OUTPUT:
        refusal = delta.merge_refusal(host)  # a gated hybrid part, a part without a weight delta, LoRA experts
        if refusal is not None:
            raise refuse(f"its {type(delta).__name__} on {host_name!r} has no fixed weight change: {refusal}")
        if _adds_weight_change(delta):
            return "lora"
    raise refuse(f"its {type(delta).__name__} on {host_name!r} is not a change of the host's weights that adds to "
                 "its output (merging takes LoRA-family, (IA)³ and selective adapters)")


def _adds_weight_change(delta: Delta) -> bool:
    """Whether the delta adds x ΔWᵀ to its host's output, ΔW its `delta_weight` (a hybrid's: every part does)."""
    if isinstance(delta, ComposedDelta):
        return all(_adds_weight_change(part) for part in delta.parts.values())
    return (type(delta).delta_weight is not Delta.delta_weight and delta.adds_term
            and delta.placement is Placement.OUTPUT)


def read_source(model: nn.Module, name: str) -> Source:
    config = get_registry(model).require(name)
    families: set[Family] = set()
    source = Source(name, config.method, "lora")
    for host_name, host, delta in adapter_deltas(model, name):
        if isinstance(delta, ModuleCopy):
            source.copies[host_name] = (host, delta)
            continue
        families.add(family_of(name, config, host_name, host, delta))
        source.deltas[host_name] = delta
    if len(families) != 1:
        raise AdapterMergeError(f"adapter {name!r} ({config.method}) has no weight, scaling or selective delta to merge"
                                if not families else f"adapter {name!r} mixes delta families {sorted(families)}")
    source.family = families.pop()
    return source


def common_family(sources: list[Source]) -> Family:
    first = sources[0]
    for other in sources[1:]:
        if other.family != first.family:
            raise AdapterMergeError(
                f"adapters {first.name!r} ({first.method}) and {other.name!r} ({other.method}) have no common merged "
                f"form: merge LoRA-family adapters together, (IA)³ adapters together, selective adapters together")
    return first.family
