"""The slot on a host module that holds its named deltas and applies them in forward hooks.

Each delta acts where its `Placement` says. INPUT deltas ((IA)³'s feed-forward vectors, OFT's rotations) act
in a pre-forward hook, so the host's own matmul runs on t(x) (a pure scale costs one elementwise product);
OUTPUT deltas act in the forward hook on the host's output, reading the host's untransformed input. A
HOST_CALL delta (a selective change of a Linear's weight: one matmul on W0 + ΔW instead of the host's plus
the delta's) replaces the host's call in un-routed passes: the host then runs `_folding_forward`, installed
on its instance `forward` while such a delta sits on it, and the output hook applies the other deltas.
SEQUENCE deltas sit in the root module's slot and are applied by `core.sequence`; TOKENS deltas insert positions
into the host's output sequence after the other output deltas (`core.tokens`).

Deltas live *beside* the host (`<module>.peftkit.<adapter>.<param>`) instead of wrapping it, so
the base model's parameter names never change and a base checkpoint loads as it is. Code outside this
module reaches them through `deltas_of`, `delta_of`, `is_delta_parameter` and `host_children`.
"""
from __future__ import annotations

import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .delta import Delta, DeltaBank, Placement
from .hosts import refusal_to_train
from .tokens import insert_tokens

if TYPE_CHECKING:
    from .registry import AdapterRegistry
    from .routing import RoutingPlan

SLOT_ATTR = "peftkit"
# From this many adapter groups of one delta type in one routed layer on, try the type's batched path.
BATCHED_MIN_GROUPS = 4


class DeltaSlot(nn.ModuleDict):
    """Named deltas of one host module; `apply` runs the active or row-routed ones."""

    def __init__(self, registry: AdapterRegistry, module_name: str):
        super().__init__()
        # underscored so no adapter name (which may not start with "_") can shadow them
        self._registry = registry  # plain attribute: shared model-level state, not a submodule
        self._module_name = module_name
        self._read_input = Delta.read_input  # how the hook takes `x` from the host's call, shared by its deltas
        self._transformed_input: tuple[torch.Tensor, torch.Tensor] | None = None  # (t(x), x) of the running call
        self._input_transforms: set[str] = set()  # names of input-transforming deltas: most hosts have none
        self._folders: set[str] = set()  # names of deltas that can replace the host's call (`Delta.host_call`)
        self._token_inserts: set[str] = set()  # names of deltas that insert tokens into the host's output sequence
        self._folded: str | None = None  # the delta folded into the running call, which the output hook skips
        self._banks: dict[type[Delta], DeltaBank | None] = {}  # per delta type: its batched path's kept state

    def forward(self, out: Any) -> Any:
        """The identity: a host that calls its children in order (nn.Sequential) passes its output through its slot
        unchanged; the slot acts through the host's hooks."""
        return out

    def __setitem__(self, name: str, delta: Delta) -> None:
        reader = type(delta).read_input
        if len(self) and reader is not self._read_input:
            raise ValueError(f"a {type(delta).__name__} reads the call of module '{self._module_name}' differently from "
                             f"the deltas already on it ({', '.join(self)}); they cannot share the module")
        self._read_input = reader
        super().__setitem__(name, delta)
        if delta.placement is Placement.INPUT:
            self._input_transforms.add(name)
        if delta.placement is Placement.HOST_CALL:
            self._folders.add(name)
        if delta.placement is Placement.TOKENS:
            self._token_inserts.add(name)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self._input_transforms.discard(name)
        self._folders.discard(name)
        self._token_inserts.discard(name)
        for bank in self._banks.values():
            if bank is not None:
                bank.discard(name)

    def folded_call(self, host: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The host's output for `x` with the first active delta that can fold into the host's call folded in,
        or None when none can (the host then runs as it is).

        Only un-routed calls with an untransformed input fold (each routed row group adds its own change), and
        only a delta that no output-reading delta precedes: those must see the base output without it."""
        self._folded = None
        registry = self._registry
        if registry.disabled or registry.plan is not None or self._transformed_input is not None:
            return None
        for name in registry.active:
            delta = self._modules.get(name)
            if delta is None or not delta.acts_on_output:
                continue
            if name in self._folders:
                out = delta.host_call(host, x)
                if out is not None:
                    self._folded = name
                    return out
            if not delta.additive:
                return None
        return None

    def transform_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """The host's input for the INPUT deltas that apply (each row its own under routing); None
        when none does.

        Un-routed, the active ones apply in active order (pure scales multiply, as their folds into the weight do,
        and as HF PEFT's (IA)³). When all are pure scales, one product (routed: one gather of per-row scales);
        otherwise, routed, each adapter group's transform runs on its own rows, and rows of no such adapter pass."""
        registry = self._registry
        if registry.disabled:
            return None
        plan = registry.plan
        names = plan.names if plan is not None else registry.active
        present = tuple(name for name in names if name in self._input_transforms and not self._modules[name].merged)
        if not present:
            return None
        deltas = [self._modules[name] for name in present]
        if plan is not None:
            plan = plan.for_rows(x.shape[0], f"module '{self._module_name}'")
        if not all(type(d).transform_input is Delta.transform_input for d in deltas):
            return _transform_rows(plan, present, deltas, x)
        scales = [d.input_scale() for d in deltas]
        if plan is None:
            scale = torch.stack(scales).prod(0) if len(scales) > 1 else scales[0]
        else:
            scale = row_scales(plan, present, scales, x)
        return (x.to(scale.dtype) * scale).to(x.dtype)

    def apply_deltas(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        registry = self._registry
        folded, self._folded = self._folded, None
        if registry.disabled:
            return out
        if registry.plan is not None:
            out = self._apply_routed(x, out)
        else:
            for name in registry.active:
                delta = self._modules.get(name)
                if delta is None or name == folded or not delta.acts_on_output:
                    continue
                out = delta.add_increment_(x, out) if delta.additive else delta.transform(x, out)
        return insert_tokens(self, registry, out, self._module_name) if self._token_inserts else out

    def _apply_routed(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        plan = self._registry.plan
        present = tuple(name for name in plan.names if name in self._modules and self._modules[name].acts_on_output)
        if not present:
            return out
        plan = plan.for_rows(x.shape[0], f"module '{self._module_name}'")
        if len(present) >= BATCHED_MIN_GROUPS:  # many small groups: one batched kernel per type beats a Python loop
            present = self._apply_batched(plan, present, x, out)
            if not present:
                return out
        perm, segments = plan.layout(present)
        # [n_routed, ...] grouped by adapter; None when no delta here reads it (a serial adapter, an output scale)
        rows_in = plan.gather(x, perm) if any(self._modules[name].reads_input for name in present) else None
        for name, start, end in segments:
            delta: Delta = self._modules[name]
            seg = rows_in[start:end] if delta.reads_input else None
            if perm is None:  # each adapter's rows are one run of the batch: write through slices, no scatter
                if delta.additive:
                    delta.add_increment_(seg, out[start:end])
                else:  # training: transform a copy, since writing the slice back would change a view that
                    base = out[start:end]  # autograd saved (IA3's l ⊙ out keeps `out` for l's gradient)
                    out[start:end] = delta.transform(seg, base.clone() if torch.is_grad_enabled() else base)
            else:
                index = perm[start:end].to(out.device)
                if delta.additive:
                    out.index_add_(0, index, delta.increment(seg).to(out.dtype))
                else:
                    out.index_copy_(0, index, delta.transform(seg, out.index_select(0, index)).to(out.dtype))
        return out

    def _apply_batched(self, plan: RoutingPlan, present: tuple[str, ...], x: torch.Tensor,
                       out: torch.Tensor) -> tuple[str, ...]:
        """Each delta type with many adapter groups here applies them at once (each row has one adapter, so the
        types' order does not matter); returns the names left for the group loop."""
        by_type: dict[type[Delta], dict[str, Delta]] = {}
        for name in present:
            by_type.setdefault(type(self._modules[name]), {})[name] = self._modules[name]
        done: set[str] = set()
        for kind, deltas in by_type.items():
            if len(deltas) >= BATCHED_MIN_GROUPS:
                if kind not in self._banks:
                    self._banks[kind] = kind.new_bank()
                done.update(kind.add_routed_batch_(deltas, plan, x, out, self._banks[kind]))
        return tuple(name for name in present if name not in done)


def deltas_of(module: nn.Module) -> Mapping[str, Delta]:
    """The deltas sitting on `module`, by adapter name (empty for a module without any)."""
    return module._modules.get(SLOT_ATTR) or {}


def delta_of(module: nn.Module, name: str) -> Delta:
    """Adapter `name`'s delta on `module` (a KeyError naming the module's adapters when it has none there)."""
    deltas = deltas_of(module)
    if name not in deltas:
        raise KeyError(f"no delta of adapter {name!r} on this {type(module).__name__} (it has: {sorted(deltas) or 'none'})")
    return deltas[name]


def is_delta_parameter(name: str) -> bool:
    """Whether a parameter or state-dict name (`encoder.query.peftkit.a.lora_A`) belongs to a delta."""
    return f".{SLOT_ATTR}." in f".{name}"


def host_children(module: nn.Module) -> dict[str, nn.Module]:
    """The module's own submodules, without its delta slot."""
    return {name: child for name, child in module.named_children() if name != SLOT_ATTR}


def row_scales(plan: RoutingPlan, names: tuple[str, ...], scales: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per-row channel scales shaped to broadcast over `like` ([rows, ..., channels]): row i takes its
    adapter's vector from [s_1, …, s_n, 1], 1 for rows of no adapter here (one gather for the batch)."""
    table = torch.stack([*scales, torch.ones_like(scales[0])])
    return table[plan.row_index(names).to(table.device)].view(like.shape[0], *[1] * (like.dim() - 2), -1)


def _transform_rows(plan: RoutingPlan | None, names: tuple[str, ...], deltas: list[Delta], x: torch.Tensor) -> torch.Tensor:
    """Input transforms that are not all pure scales: un-routed, each in turn; routed, each adapter group's on its
    own rows (gathered, or sliced when the group's rows are one run), the other rows unchanged."""
    if plan is None:
        for delta in deltas:
            x = delta.transform_input(x)
        return x
    perm, segments = plan.layout(names)
    rows_in = plan.gather(x, perm)
    out = x.clone()
    for delta, (_, start, end) in zip(deltas, segments):
        rows = delta.transform_input(rows_in[start:end]).to(x.dtype)
        if perm is None:
            out[start:end] = rows
        else:
            out.index_copy_(0, perm[start:end].to(x.device), rows)
    return out


def _slot_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    """Run the host on t(x) when an INPUT delta applies; remember x for the output hook's deltas."""
    slot: DeltaSlot = getattr(module, SLOT_ATTR)
    if not slot._input_transforms:
        return None
    x = args[0] if args else next(iter(kwargs.values()), None)  # a linear host's input, however passed
    scaled = None if x is None else slot.transform_input(x)
    if scaled is None:
        return None
    slot._transformed_input = (scaled, x)
    if args:
        return (scaled, *args[1:]), kwargs
    return args, {**kwargs, next(iter(kwargs)): scaled}


def _slot_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    slot: DeltaSlot = getattr(module, SLOT_ATTR)
    x = slot._read_input(args, kwargs)
    scaled = slot._transformed_input
    if scaled is not None:
        slot._transformed_input = None
        if x is scaled[0]:  # this call's input was transformed before the host: the other deltas read it as it came
            x = scaled[1]
    if isinstance(output, tuple):  # an attention module returns (hidden states, attention weights): deltas act on the first
        return (slot.apply_deltas(x, output[0]), *output[1:])
    return slot.apply_deltas(x, output)


def _folding_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The host's call, or one that folds a delta into it (`DeltaSlot.folded_call`); gone with the last such delta."""
    forward = type(module).forward
    slot: DeltaSlot | None = getattr(module, SLOT_ATTR, None)
    if slot is None or not slot._folders:
        del module.__dict__["forward"]
        return forward(module, *args, **kwargs)
    out = slot.folded_call(module, slot._read_input(args, kwargs))
    return forward(module, *args, **kwargs) if out is None else out


def _installed_folding(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _folding_forward


def add_delta(module: nn.Module, registry: AdapterRegistry, module_name: str, name: str, delta: Delta) -> None:
    """Put `delta` into the module's slot (made on first use), folding it into the module's call where it can."""
    refusal = refusal_to_train(module) if delta.trains_host_parameters else None
    if refusal is not None:
        raise ValueError(f"{type(delta).__name__} cannot sit on module '{module_name}': {refusal}")
    slot = getattr(module, SLOT_ATTR, None)
    if slot is None:
        slot = DeltaSlot(registry, module_name)
        setattr(module, SLOT_ATTR, slot)
        module.register_forward_pre_hook(_slot_pre_hook, with_kwargs=True)
        module.register_forward_hook(_slot_hook, with_kwargs=True)
    slot[name] = delta
    if delta.placement is Placement.HOST_CALL and "forward" not in module.__dict__:  # not over another library's patched forward
        module.forward = types.MethodType(_folding_forward, module)  # a bound method: deep copies rebind it


def remove_delta(module: nn.Module, name: str) -> None:
    """Take `name` out of the module's slot; the last one out takes the slot and its hooks along."""
    slot: DeltaSlot = getattr(module, SLOT_ATTR)
    del slot[name]
    if len(slot) == 0:
        detach_slot(module)


def detach_slot(module: nn.Module) -> None:
    """Remove the slot and its hook, leaving the bare module.

    The hook is found by identity rather than through a handle, because a deep copy of the
    module (a task-head copy) shares the function but not a usable handle.
    """
    for key, hook in list(module._forward_hooks.items()):
        if hook is _slot_hook:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _slot_pre_hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    if _installed_folding(module):
        del module.__dict__["forward"]
    delattr(module, SLOT_ATTR)
