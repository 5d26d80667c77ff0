"""The public operations on a model: attach, remove, activate, route, merge, summarise.

Every method plugs in through its config's `build()`; nothing here knows about LoRA.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .core.config import AdapterConfig
from .core.delta import Delta, ModuleCopy
from .core.registry import REGISTRY_ATTR, AdapterRegistry, adapter_deltas, get_registry
from .core.routing import RoutingPlan
from .core.shared_input import SharedInputGroup
from .core.slot import SLOT_ATTR, DeltaSlot, add_delta, remove_delta
from .core.targets import match_targets

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
_RESERVED = frozenset(dir(DeltaSlot)) | frozenset(vars(nn.Module()))  # names a slot already uses


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
        raise ValueError(f"adapter name {name!r} is invalid: use letters, digits, '_' or '-', starting with a letter or digit, and not a torch Module attribute")


def attach(model: nn.Module, config: AdapterConfig, name: str = "default", activate: bool = True) -> nn.Module:
    """Attach a new named adapter built from `config`; freeze the base; return the model.

    The new adapter is trainable and, unless `activate=False`, becomes the only active one.
    """
    _check_name(name)
    registry = get_registry(model, create=True)
    if name in registry.configs:
        raise ValueError(f"an adapter named {name!r} is already attached; remove it first or pick another name")
    if config.rewrites_base and any(c.rewrites_base for c in registry.configs.values()):
        raise ValueError("only one adapter that rewrites the base weights (PiSSA) can be attached at a time")
    host_names = config.choose_hosts(model)
    copy_names = match_targets(model, config.modules_to_save) if config.modules_to_save else []
    overlap = set(host_names) & set(copy_names)
    if overlap:
        raise ValueError(f"modules both targeted and in modules_to_save: {sorted(overlap)}")
    placed: list[str] = []
    built = config.build_all({host_name: model.get_submodule(host_name) for host_name in host_names})
    try:
        for host_name in host_names + copy_names:
            host = model.get_submodule(host_name)
            try:
                delta = next(built) if host_name in host_names else ModuleCopy(host)
            except ValueError as err:  # a delta checks its host's shape without knowing the module's name
                raise ValueError(f"{config.method} cannot adapt module {host_name!r}: {err}") from err
            delta.train(host.training)  # a new module starts in training mode: follow the model's (dropout, DyLoRA's rank)
            add_delta(host, registry, host_name, name, delta)
            placed.append(host_name)
    except Exception:
        _remove_deltas(model, name, placed)
        raise
    registry.configs[name] = config
    registry.hosts[name] = placed
    _link_shared_inputs(model, placed, name)
    for param_name, param in model.named_parameters():
        if f".{SLOT_ATTR}." not in f".{param_name}":
            param.requires_grad_(False)
    if activate:
        registry.active = [name]
    return model


def _link_shared_inputs(model: nn.Module, host_names: list[str], name: str) -> None:
    """Group this adapter's linear deltas on sibling modules of equal input width (q, k, v)."""
    groups: dict[tuple[str, int], list[Delta]] = {}
    for host_name in host_names:
        delta = getattr(model.get_submodule(host_name), SLOT_ATTR)[name]
        if hasattr(delta, "down_weight") and getattr(delta, "kind", None) in ("linear", "conv1d"):
            parent = host_name.rpartition(".")[0]
            groups.setdefault((parent, delta.down_weight().shape[1]), []).append(delta)
    for members in groups.values():
        if len(members) > 1:
            group = SharedInputGroup(members)
            for delta in members:
                delta.shared = group


def _remove_deltas(model: nn.Module, name: str, host_names: list[str]) -> None:
    for host_name in host_names:
        host = model.get_submodule(host_name)
        delta = getattr(host, SLOT_ATTR)[name]
        if delta.merged:
            delta.unmerge_from(host)
        if delta.rewrites_base:
            delta.restore_base(host)
        remove_delta(host, name)


def remove(model: nn.Module, name: str) -> nn.Module:
    """Detach an adapter (unmerging it first if merged); the base weights are left as before attach."""
    registry = get_registry(model)
    registry.require(name)
    _remove_deltas(model, name, registry.hosts.pop(name))
    del registry.configs[name]
    registry.merged.discard(name)
    registry.active = [n for n in registry.active if n != name]
    return model


def activate(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters (their outputs add up) for un-routed forward passes."""
    registry = get_registry(model)
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        registry.require(name)
    _check_base_owner(registry, names, "activating")
    registry.active = names


def active_adapters(model: nn.Module) -> list[str]:
    return list(get_registry(model).active)


def adapters(model: nn.Module) -> dict[str, AdapterConfig]:
    """Attached adapters and their configs, in attach order (empty for a bare model)."""
    registry = model.__dict__.get(REGISTRY_ATTR)
    return dict(registry.configs) if registry is not None else {}


def _check_base_owner(registry: AdapterRegistry, using: Sequence[str | None], what: str) -> None:
    """An adapter that rewrote the base (PiSSA) must be used by every row, or rows get a wrong base."""
    owners = [n for n, c in registry.configs.items() if c.rewrites_base]
    if owners and (None in using or any(owner not in using for owner in owners)):
        raise ValueError(
            f"{what} without adapter {owners[0]!r} would run on its PiSSA residual base weights, giving wrong "
            f"outputs; save it and load it back (it loads as a plain LoRA) to mix it with other adapters"
        )


@contextmanager
def routed(model: nn.Module, row_adapters: Sequence[str | None]) -> Iterator[RoutingPlan]:
    """Inside this block, row i of every batch uses adapter `row_adapters[i]` (None: the bare base)."""
    registry = get_registry(model)
    for name in set(row_adapters) - {None}:
        registry.require(name)
    if registry.merged:
        raise ValueError(f"adapters {sorted(registry.merged)} are merged into the base weights; unmerge them before per-row routing")
    _check_base_owner(registry, list(row_adapters), "routing rows")
    plan, previous = RoutingPlan(row_adapters), registry.plan
    registry.plan = plan
    try:
        yield plan
    finally:
        registry.plan = previous
        plan.release()


@contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run the bare base model inside this block."""
    registry = get_registry(model)
    if registry.merged:
        raise ValueError(f"adapters {sorted(registry.merged)} are merged into the base weights; unmerge them to run the bare base")
    _check_base_owner(registry, [None], "running the bare base")
    previous, registry.disabled = registry.disabled, True
    try:
        yield
    finally:
        registry.disabled = previous


@torch.no_grad()
def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights for zero-overhead inference."""
    registry = get_registry(model)
    names = registry.active if names is None else [names] if isinstance(names, str) else list(names)
    for name in names:
        registry.require(name)
        if name in registry.merged:
            raise ValueError(f"adapter {name!r} is already merged")
    for name in names:
        done: list[tuple[nn.Module, Delta]] = []
        for _, host, delta in adapter_deltas(model, name):
            try:
                delta.merge_into(host)
            except NotImplementedError as err:  # a non-linear method: undo this adapter's hosts, name the method
                for merged_host, merged_delta in done:
                    merged_delta.unmerge_from(merged_host)
                    merged_delta.merged = False
                raise ValueError(f"cannot merge adapter {name!r}: method {registry.configs[name].method!r} has no "
                                 f"weight delta to fold into the base ({err})") from err
            delta.merged = True
            done.append((host, delta))
        registry.merged.add(name)


@torch.no_grad()
def unmerge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Take merged adapters (default: all merged ones) back out of the base weights."""
    registry = get_registry(model)
    names = sorted(registry.merged) if names is None else [names] if isinstance(names, str) else list(names)
    for name in names:
        registry.require(name)
        if name not in registry.merged:
            raise ValueError(f"adapter {name!r} is not merged")
        for _, host, delta in adapter_deltas(model, name):
            delta.unmerge_from(host)
            delta.merged = False
        registry.merged.discard(name)


def unload(model: nn.Module, merge_active: bool = True) -> nn.Module:
    """Return the plain base model: active adapters merged in (if `merge_active`), all peftkit state gone."""
    registry = get_registry(model)
    if merge_active:
        merge(model, [n for n in registry.active if n not in registry.merged])
    for name in list(registry.configs):
        if name in registry.merged:  # keep merged weights: drop the delta without unmerging
            for _, host, delta in adapter_deltas(model, name):
                delta.merged = False
                delta.rewrites_base = False
            registry.merged.discard(name)
        remove(model, name)
    del model.__dict__[REGISTRY_ATTR]
    return model


def set_trainable(model: nn.Module, name: str, trainable: bool = True) -> None:
    """Freeze or unfreeze one adapter's parameters."""
    for _, _, delta in adapter_deltas(model, name):
        delta.requires_grad_(trainable)


def adapter_parameters(model: nn.Module, name: str) -> Iterator[nn.Parameter]:
    """The parameters of one adapter (for an optimizer)."""
    for _, _, delta in adapter_deltas(model, name):
        yield from delta.parameters()


@dataclass
class Summary:
    total: int
    trainable: int
    per_adapter: dict[str, int]
    per_module: dict[str, dict[str, int]]

    def __str__(self) -> str:
        lines = [f"{'adapter':<20}{'modules':>9}{'params':>14}"]
        for name, count in self.per_adapter.items():
            lines.append(f"{name:<20}{len(self.per_module.get(name, {})):>9}{count:>14,}")
        share = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"trainable {self.trainable:,} of {self.total:,} parameters ({share:.4f}%)")
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Parameter counts: total, trainable, per adapter and per (adapter, module)."""
    registry = get_registry(model)
    per_module = {
        name: {host_name: sum(p.numel() for p in getattr(model.get_submodule(host_name), SLOT_ATTR)[name].parameters())
               for host_name in registry.hosts[name]}
        for name in registry.configs
    }
    return Summary(
        total=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        per_adapter={name: sum(counts.values()) for name, counts in per_module.items()},
        per_module=per_module,
    )
