"""The public operations on a model: attach, load, remove, activate, route, merge, summarise.

Every method plugs in through its config's `build()`; nothing here knows about LoRA.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from .core.config import AdapterConfig
from .core import merging
from .core.delta import Delta, ModuleCopy
from .core.io import AdapterFileError, fill_adapter, read_adapter
from .core.merging import MergeError
from .core.registry import REGISTRY_ATTR, AdapterRegistry, adapter_deltas, get_registry
from .core.routing import RoutingPlan
from .core.slot import DeltaSlot, add_delta, delta_of, remove_delta
from .core.targets import match_targets, own_modules

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
_RESERVED = frozenset(dir(DeltaSlot)) | frozenset(vars(nn.Module()))  # names a slot already uses


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
        raise ValueError(f"adapter name {name!r} is invalid: use letters, digits, '_' or '-', starting with a letter or digit, and not a torch Module attribute")


def attach(model: nn.Module, config: AdapterConfig, name: str = "default", activate: bool = True) -> nn.Module:
    """Attach a new named adapter built from `config`; freeze the base; return the model.

    The new adapter is trainable and, unless `activate=False`, becomes the only active one beside the merged
    adapters (they act on every pass while they sit in the weights).
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
    with merging.unfolded(model, registry, host_names + copy_names):  # built on the base, not on merged weights
        _place(model, registry, config, name, host_names, copy_names)
    registry.configs[name] = config
    registry.hosts[name] = host_names + copy_names
    _link(model, name)
    try:
        config.on_attach(model, name)
    except Exception:
        remove(model, name)
        raise
    freeze_base(model)
    if activate:
        activate_new(model, name)
    return model


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter of the model's own modules (never a delta's): costs the same however many adapters
    are loaded."""
    for _, module in own_modules(model):
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)


def _place(model: nn.Module, registry: AdapterRegistry, config: AdapterConfig, name: str, host_names: list[str],
           copy_names: list[str]) -> None:
    """Build and place one delta per host (a head copy per module to save); on any error, remove those placed."""
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


def activate_new(model: nn.Module, name: str) -> None:
    """Make a just attached adapter the only active one beside the merged adapters (they act on every pass while
    they sit in the weights); if that cannot give the unmerged outputs, detach it again and raise `MergeError`."""
    registry = get_registry(model)
    active = [n for n in registry.active if n in registry.merged and n != name] + [name]
    try:
        _set_state(model, registry, active, registry.merged, f"activating {name!r} beside merged {active[:-1]}", [])
    except MergeError:
        remove(model, name)
        raise


def _set_state(model: nn.Module, registry: AdapterRegistry, active: list[str], merged: set[str], what: str,
               changing: Sequence[str]) -> None:
    """Make (`active`, `merged`) the model's state, refusing before any change if the merged forward would differ
    from the unmerged one; `changing`: the adapters whose hosts' fold stacks may move."""
    merging.check(model, registry, active, merged, what)
    merging.rewrite(model, registry, active, merged, changing, what)
    registry.active, registry.merged = list(active), set(merged)


def _link(model: nn.Module, name: str) -> None:
    """Let each delta type connect this adapter's deltas of that type (LoRA: siblings that share an input)."""
    by_type: dict[type[Delta], dict[str, Delta]] = {}
    for host_name, _, delta in adapter_deltas(model, name):
        by_type.setdefault(type(delta), {})[host_name] = delta
    for kind, deltas in by_type.items():
        kind.link_adapter(deltas)


def _remove_deltas(model: nn.Module, name: str, host_names: list[str]) -> None:
    for host_name in host_names:
        host = model.get_submodule(host_name)
        delta = delta_of(host, name)
        if delta.rewrites_base:
            delta.restore_base(host)
        remove_delta(host, name)


def remove(model: nn.Module, name: str) -> nn.Module:
    """Detach an adapter (unmerging it first if merged); the base weights are left as before attach."""
    registry = get_registry(model)
    registry.require(name)
    if name in registry.merged or name in registry.active:
        _set_state(model, registry, [n for n in registry.active if n != name], registry.merged - {name},
                   f"removing {name!r}", [name])
    # PiSSA puts W0 back: under no merged adapter (others' folds are left as they are, bit for bit)
    rewrote = registry.configs[name].rewrites_base
    with merging.unfolded(model, registry, registry.hosts[name] if rewrote else []):
        _remove_deltas(model, name, registry.hosts.pop(name))
    del registry.configs[name]
    return model


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, activate: bool = True,
         strict: bool = True) -> str:
    """Attach the adapter saved at `path` under `name` (default: its saved name or "default").

    The file must fit the adapter its config builds on this model: no tensors for modules outside its targets
    (for a PEFT file: PEFT's target_modules rules), none missing for a targeted module. `strict=False` is PEFT's
    leniency: it warns about those, ignores the extra tensors and leaves missing ones at their fresh init.
    Targets that match nothing, wrong shapes or dtypes and NaN / inf values are errors either way.
    On any error the model is left as it was: no half-loaded adapter, the same active ones.
    """
    config, tensors, saved_name = read_adapter(path, model)
    name = name or saved_name or "default"
    try:
        attach(model, config, name=name, activate=False)
    except ValueError as err:  # the file's targets do not fit this model (a module type, a rank)
        if name in get_registry(model).configs:
            raise
        raise AdapterFileError(f"{path}: {err}") from err
    try:
        fill_adapter(model, name, tensors, path, strict)
    except BaseException:  # even on Ctrl-C: no half-loaded adapter
        remove(model, name)
        raise
    if activate:
        activate_new(model, name)
    return name


def activate(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters (their outputs add up) for un-routed forward passes.

    Merged adapters act on every pass while they sit in the weights, so they must stay active."""
    registry = get_registry(model)
    names = _names(names)
    for name in names:
        registry.require(name)
    _check_base_owner(registry, names, "activating")
    _set_state(model, registry, names, registry.merged, f"activating {names}", sorted(registry.merged))


def _names(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


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


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights for zero-overhead inference.

    The merged forward equals the unmerged forward of the same active adapters, or this raises `MergeError` naming
    the host and the reason before any weight changes (see core.merging for the rules)."""
    registry = get_registry(model)
    if names is None:
        names = [n for n in registry.active if n not in registry.merged]
        if not names:
            raise ValueError(f"no active adapter left to merge: active {registry.active}, already merged "
                             f"{sorted(registry.merged)}")
    names = _names(names)
    for name in names:
        registry.require(name)
        if name in registry.merged:
            raise ValueError(f"adapter {name!r} is already merged")
        if name not in registry.active:
            raise MergeError(f"adapter {name!r} is not active: merging folds active adapters into the weights "
                             f"(activate it first; active: {registry.active})")
    _set_state(model, registry, registry.active, registry.merged | set(names), f"merging {names}", names)


def unmerge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Take merged adapters (default: all merged ones) back out of the base weights, in any order or grouping.

    Each host's merged deltas are unfolded from the top of its stack and the ones that stay are folded back, so
    the base comes back to float rounding; a state whose outputs would differ from the unmerged forward (an adapter
    left merged that rescales one taken out) raises `MergeError` before any change."""
    registry = get_registry(model)
    names = sorted(registry.merged) if names is None else _names(names)
    for name in names:
        registry.require(name)
        if name not in registry.merged:
            raise ValueError(f"adapter {name!r} is not merged")
    _set_state(model, registry, registry.active, registry.merged - set(names), f"unmerging {names}", names)


def unload(model: nn.Module, merge_active: bool = True) -> nn.Module:
    """Return the plain base model: active adapters merged in (if `merge_active`), all peftkit state gone."""
    registry = get_registry(model)
    if merge_active:
        merge(model, [n for n in registry.active if n not in registry.merged])
    for name in registry.merged:  # merged weights stay: forget them, so removing the deltas does not unfold them
        for _, _, delta in adapter_deltas(model, name):
            delta.merged, delta.rewrites_base, delta.merge_snapshot = False, False, None
    registry.merged, registry.merge_stacks, registry.active = set(), {}, []
    for name in list(registry.configs):
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
        name: {host_name: sum(p.numel() for p in delta.parameters()) for host_name, _, delta in adapter_deltas(model, name)}
        for name in registry.configs
    }
    return Summary(
        total=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        per_adapter={name: sum(counts.values()) for name, counts in per_module.items()},
        per_module=per_module,
    )
