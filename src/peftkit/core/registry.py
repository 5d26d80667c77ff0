"""Model-level adapter state: which adapters are attached, where, and which are active."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from .config import AdapterConfig
from .routing import RoutingPlan

if TYPE_CHECKING:
    from .delta import Delta

REGISTRY_ATTR = "_peftkit_registry"


class UnknownAdapterError(KeyError):
    """An adapter name that is not attached to the model."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


@dataclass
class AdapterRegistry:
    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    hosts: dict[str, list[str]] = field(default_factory=dict)  # adapter -> host module names
    active: list[str] = field(default_factory=list)
    merged: set[str] = field(default_factory=set)
    merge_stacks: dict[str, list[str]] = field(default_factory=dict)  # host -> merged deltas in fold order (core.merging)
    plan: RoutingPlan | None = None
    disabled: bool = False
    caller_places_virtual_tokens: bool = False  # a serving engine writes prompts and prefixes itself (core.sequence)

    def require(self, name: str) -> AdapterConfig:
        if name not in self.configs:
            known = ", ".join(self.configs) or "none"
            raise UnknownAdapterError(f"no adapter named {name!r} on this model (attached: {known})")
        return self.configs[name]


def get_registry(model: nn.Module, create: bool = False) -> AdapterRegistry:
    registry = model.__dict__.get(REGISTRY_ATTR)
    if registry is None:
        if not create:
            raise ValueError("this model has no peftkit adapters attached (use peftkit.attach first)")
        registry = AdapterRegistry()
        model.__dict__[REGISTRY_ATTR] = registry
    return registry


def adapter_deltas(model: nn.Module, name: str) -> Iterator[tuple[str, nn.Module, "Delta"]]:
    """(host name, host module, delta) of every host one adapter sits on."""
    from .slot import delta_of  # the slot module imports this one

    registry = get_registry(model)
    registry.require(name)
    for host_name in registry.hosts[name]:
        host = model.get_submodule(host_name)
        yield host_name, host, delta_of(host, name)
