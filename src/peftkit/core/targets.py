"""Which modules an adapter goes on: one pure function over module names and types.

- a string is a regex that must match the *whole* module name (`.*\\.(query|value)`),
  except the special value "all-linear" (every linear layer but the output head);
- a list holds exact names or dotted suffixes (`"query"` matches `...attention.self.query`),
  or module types as `"type:Linear"` (the class or any base class by name), and each entry
  must match something, so a typo is caught instead of silently ignored;
- `exclude` uses the same syntax and removes matches.

Structural look-ups for methods placed by the model's shape rather than by names: `block_list` (the ModuleList of
transformer blocks), `patch_projection` (a vision transformer's patch embedding) and `io_widths` (the widths a
linear layer or a block of them reads and writes).
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

from torch import nn

from .hosts import LINEAR_TYPES, host_shape

ALL_LINEAR = "all-linear"
SLOT_NAME = "peftkit"  # the attribute holding a host's deltas (core.slot.SLOT_ATTR; that module imports this one)
TYPE_PREFIX = "type:"
_LAYER_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


class TargetError(ValueError):
    """A target specification that matches nothing, or matches a module of the wrong type."""


def own_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the model's own modules, in model order, never descending into peftkit's delta slots: a walk
    that costs the same however many adapters are attached (a server attaches adapters while others are loaded)."""
    seen: set[int] = set()
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        children = [(f"{name}.{child}" if name else child, sub) for child, sub in module._modules.items()
                    if sub is not None and child != SLOT_NAME]
        stack.extend(reversed(children))


def _matches(name: str, module: nn.Module, entry: str) -> bool:
    if entry.startswith(TYPE_PREFIX):
        return any(cls.__name__ == entry[len(TYPE_PREFIX):] for cls in type(module).__mro__)
    return name == entry or name.endswith("." + entry)


def uses_types(spec: str | list[str] | None) -> bool:
    """True when a list spec names module types (which other tools, e.g. HF PEFT, cannot read)."""
    return isinstance(spec, list) and any(entry.startswith(TYPE_PREFIX) for entry in spec)


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output layer (an LM head), which 'all-linear' leaves alone."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in own_modules(model) if head is not None and module is head}


def _close_names(names: list[str], wanted: str) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names} | set(names))
    close = difflib.get_close_matches(wanted, leaves, n=5, cutoff=0.5)
    return ", ".join(close) if close else ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})[:12])


def _select(names: list[str], spec: str | list[str], model: nn.Module, what: str) -> set[str]:
    if isinstance(spec, str):
        if spec == ALL_LINEAR:
            heads = _output_head_names(model)
            modules = dict(own_modules(model))
            return {n for n in names if isinstance(modules[n], LINEAR_TYPES) and n not in heads}
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise TargetError(f"{what} regex {spec!r} is invalid: {err}") from None
        found = {n for n in names if pattern.fullmatch(n)}
        if not found:
            raise TargetError(f"{what} regex {spec!r} matches no module; close module names: {_close_names(names, spec)}")
        return found
    found: set[str] = set()
    modules = dict(own_modules(model))
    for entry in spec:
        hits = {n for n in names if _matches(n, modules[n], entry)}
        if not hits:
            raise TargetError(f"{what} {entry!r} matches no module; close module names: {_close_names(names, entry)}")
        found |= hits
    return found


def layer_number(name: str) -> int | None:
    """The numbered layer a module sits in: the first number in its dotted name (`encoder.layer.3.output.dense`: 3);
    None outside numbered layers."""
    found = _LAYER_NUMBER.search(name)
    return int(found.group(1)) if found else None


def module_names(model: nn.Module) -> list[str]:
    """The model's own module names, in model order: no root, none of peftkit's deltas."""
    return [n for n, _ in own_modules(model) if n]


def match_targets(
    model: nn.Module,
    targets: str | list[str],
    exclude: str | list[str] | None = None,
    host_types: tuple[type[nn.Module], ...] = (nn.Module,),
) -> list[str]:
    """Names of the modules selected by `targets` minus `exclude`, in model order.

    Raises TargetError when nothing matches or a matched module is not one of `host_types`.
    """
    names = module_names(model)
    chosen = _select(names, targets, model, "target")
    if exclude:
        chosen -= _select(names, exclude, model, "exclude")
    if not chosen:
        raise TargetError(f"targets {targets!r} minus exclude {exclude!r} leave no module to adapt")
    modules = dict(own_modules(model))
    wrong = [n for n in chosen if not isinstance(modules[n], host_types)]
    if wrong:
        allowed = ", ".join(t.__name__ for t in host_types)
        details = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in sorted(wrong)[:5])
        raise TargetError(f"targets match modules this method cannot adapt: {details}; supported types: {allowed}")
    return [n for n in names if n in chosen]


def block_list(model: nn.Module, name: str | None) -> tuple[str, int]:
    """(name, length) of the ModuleList of blocks: the one named, or the model's unique longest one."""
    if name is not None:
        try:
            blocks = model.get_submodule(name)
        except AttributeError:
            raise TargetError(f"blocks {name!r} is not a module of this model") from None
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise TargetError(f"blocks {name!r} is a {type(blocks).__name__}, not a non-empty ModuleList of blocks")
        return name, len(blocks)
    lists = [(n, len(m)) for n, m in own_modules(model) if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise TargetError("this model has no ModuleList of blocks; name the blocks with blocks=...")
    longest = max(size for _, size in lists)
    names = [n for n, size in lists if size == longest]
    if len(names) > 1:
        raise TargetError(f"several block lists of {longest} blocks ({', '.join(names)}); name one with blocks=...")
    return names[0], longest


def patch_projection(module: nn.Module) -> nn.Conv2d | None:
    """The patch embedding inside `module`: a Conv2d cutting the image into non-overlapping patches (stride equal
    to its kernel, larger than 1), as every vision transformer's; None when there is none (a text model, a CNN)."""
    for _, sub in own_modules(module):
        if isinstance(sub, nn.Conv2d) and tuple(sub.stride) == tuple(sub.kernel_size) and max(sub.kernel_size) > 1:
            return sub
    return None


def io_widths(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a linear layer, or of a block of them (an attention or MLP module): its first
    linear layer's input and its last one's output. A module holding no linear layer is a ValueError."""
    linears = [sub for _, sub in own_modules(module) if isinstance(sub, LINEAR_TYPES)]
    if not linears:
        raise ValueError(f"{type(module).__name__} holds no linear layer to read its input and output widths from")
    return host_shape(linears[0]).in_features, host_shape(linears[-1]).out_features
