"""AdapterFusion: attention over trained adapters (Pfeiffer et al., 2021, arXiv:2005.00247).

    h ← h + Σ_n s_n · V a_n(h),   s = softmax_n( (Q h + b_Q) · (K a_n(h) + b_K) )

Stage 1 trains single-task bottleneck adapters a_1..a_N (`peftkit.Bottleneck`). Stage 2 (this
method) sits on the same modules, freezes them, and learns only Q, K and V: at every position the
sublayer output h is the query, each adapter's output a_n(h) (its increment, as AdapterHub uses)
is a key and a value, and the softmax weights mix the values. V starts at the identity (the
paper's init) and Q, K at N(0, 0.02²) with zero biases (AdapterHub's), so a fresh fusion outputs
a convex combination of the adapters' outputs h + a_n(h), their plain average when Q h or K a_n is
zero. Not mergeable (the mix depends on the input). The fused adapters must stay attached: the
fusion saves and loads only Q, K and V, and finds its adapters by name.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from ...core.config import AdapterConfig, TargetSpec, register_method
from ...core.delta import Delta
from ...core.hosts import host_shape
from ...core.registry import get_registry
from ...core.slot import deltas_of

FUSED_MODULES = "fused-adapters"  # the only placement: wherever the fused adapters sit
_INIT_STD = 0.02


class FusionError(ValueError):
    """Adapters that cannot be fused: not bottleneck adapters, not on the same modules, or removed."""


@register_method
class AdapterFusion(AdapterConfig):
    """AdapterFusion config: the names of the attached bottleneck adapters to fuse (at least two)."""

    method: ClassVar[str] = "adapter_fusion"
    adapters: list[str] = Field(min_length=2, description="attached bottleneck adapters to fuse, frozen while it trains")
    targets: TargetSpec = Field(FUSED_MODULES, description="always the modules of the fused adapters")

    @field_validator("adapters")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"adapters to fuse must be distinct, got {value}")
        return value

    @field_validator("targets", "exclude")
    @classmethod
    def _placement_is_the_adapters(cls, value: Any, info: Any) -> Any:
        if value not in (FUSED_MODULES, None) or (info.field_name == "exclude" and value is not None):
            raise ValueError("AdapterFusion sits exactly on the modules of the adapters it fuses; leave targets and "
                             "exclude unset")
        return value

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Module,)

    def choose_hosts(self, model: nn.Module) -> list[str]:
        registry = get_registry(model)
        for name in self.adapters:
            method = registry.require(name).method
            if method != "bottleneck":
                raise FusionError(f"AdapterFusion fuses bottleneck adapters; {name!r} is a {method} adapter")
        # the adapters' own modules, not the task-head copies (modules_to_save) they may also hold
        placements = {name: registry.configs[name].choose_hosts(model) for name in self.adapters}
        first = self.adapters[0]
        for name, hosts in placements.items():
            if hosts != placements[first]:
                raise FusionError(f"adapters to fuse must sit on the same modules with the same hidden size: "
                                  f"{first!r} is on {_widths(model, placements[first])}, {name!r} on {_widths(model, hosts)}")
        return list(placements[first])

    def build(self, host: nn.Module) -> "FusionDelta":
        return FusionDelta(host, self.adapters)


def _widths(model: nn.Module, hosts: list[str]) -> dict[str, int]:
    """Each module's output width (the hidden size its adapters write)."""
    return {host: host_shape(model.get_submodule(host)).out_features for host in hosts}


class FusionDelta(Delta):
    """Q, K, V of one fusion layer; transform(x, h) = h + Σ_n s_n V a_n(h)."""

    additive = False

    def __init__(self, host: nn.Module, adapters: list[str]):
        super().__init__()
        slot = deltas_of(host)
        self._slot = (slot,)  # a tuple, not a submodule: the fused adapters are saved and counted as themselves
        self.adapters = tuple(adapters)
        for name in adapters:
            slot[name].requires_grad_(False)  # stage 2 trains the fusion only
        width = slot[adapters[0]].up.out_features
        factory = {"dtype": torch.float32, "device": slot[adapters[0]].up.weight.device}
        self.query = nn.Linear(width, width, **factory)
        self.key = nn.Linear(width, width, **factory)
        self.value = nn.Linear(width, width, bias=False, **factory)
        for layer in (self.query, self.key):
            nn.init.normal_(layer.weight, std=_INIT_STD)
            nn.init.zeros_(layer.bias)
        nn.init.eye_(self.value.weight)

    def adapter_outputs(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """a_n(h) of every fused adapter, stacked: [..., N, width]."""
        slot, increments = self._slot[0], []
        for name in self.adapters:
            if name not in slot:
                raise FusionError(f"adapter {name!r} fused here was removed; remove the fusion or attach it again")
            adapter = slot[name]
            increments.append(adapter.increment(x) if adapter.additive else adapter.transform(x, out) - out)
        return torch.stack(increments, dim=-2).to(self.value.weight.dtype)

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = out.to(self.value.weight.dtype)
        outputs = self.adapter_outputs(x, out)
        scores = (self.query(h).unsqueeze(-2) * self.key(outputs)).sum(-1)  # [..., N]
        mixed = (torch.softmax(scores, dim=-1).unsqueeze(-1) * self.value(outputs)).sum(-2)
        return (h + mixed).to(out.dtype)

    def merge_refusal(self, host: nn.Module) -> str | None:
        return "the attention over adapters depends on the input, so it has no weight delta"
