"""Merge algebra: which adapters may sit in the base weights while the others run unmerged, and the way in and out.

The reference is always the *unmerged* forward of the active adapters. On one host it reads

    h = O_k ∘ … ∘ O_1 ∘ W0 ∘ T_m ∘ … ∘ T_1 (x)

with the input-side deltas T ((IA)³'s feed-forward vectors, OFT's rotations) applied to x in active order and
the output-side deltas O (increments such as LoRA's, rescalings such as (IA)³'s or DoRA's, head copies) applied
to the host's output in active order. Merging folds deltas into W0 from the inside out, so a state with some
adapters merged gives the same outputs exactly when the merged ones can be brought next to W0 by swapping
neighbours that commute (two increments that read x; two (IA)³ vectors on the same side), and:
- an output-side delta that reads x (an increment, a head copy) is merged only when every input-side delta is
  (merged, it would see the transformed input);
- a delta that reads the base weight itself (DoRA's norm) sees the pristine W0: nothing else is merged on its
  host while it is active and unmerged, and when merged it is the first fold.

Each host keeps the stack of its merged deltas in fold order (input side nearest W0 first, then the output side
in active order). Every change of the merged or active set is checked against these rules first (a refusal
changes nothing), then applied by popping the stack down to what stays and pushing the rest, so unmerging in
any order or grouping restores the base to float rounding. A delta's tensors are snapshotted when it is
pushed, so unmerging subtracts what was added even if the adapter changed while merged. A quantized host's stored
weight is kept too when a delta is pushed (`core.hosts.RestorableHost`) and put back when it is popped: pops are
last-in first-out per host, so this restores its weight bit for bit instead of re-quantizing W − ΔW.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .delta import Delta, ModuleCopy, Placement
from .hosts import stored_state
from .registry import AdapterRegistry
from .slot import DeltaSlot, deltas_of


class MergeError(ValueError):
    """A merge, unmerge or activation that would make the merged forward differ from the unmerged one."""


def fold_order(slot: DeltaSlot, active: Sequence[str]) -> list[str]:
    """The active deltas of one host in fold order: input side nearest W0 first, then the output side in active order."""
    outside_host = (Placement.SEQUENCE, Placement.TOKENS)  # written into the sequence, never into a weight
    present = [name for name in active if name in slot and slot[name].placement not in outside_host]
    inputs = [name for name in reversed(present) if _on_input(slot[name])]
    return inputs + [name for name in present if not _on_input(slot[name])]


def _on_input(delta: Delta) -> bool:
    return delta.placement is Placement.INPUT


def _conflict(slot: DeltaSlot, host_name: str, active: Sequence[str], merged: set[str]) -> str | None:
    """Why this host's outputs would differ from the unmerged forward with `merged` folded in, or None."""
    order = fold_order(slot, active)
    stack = [name for name in order if name in merged]
    for side in ([n for n in order if _on_input(slot[n])], [n for n in order if not _on_input(slot[n])]):
        for i, inner in enumerate(side):
            if inner in merged:
                continue
            for outer in side[i + 1:]:
                if outer in merged and not slot[inner].commutes_with(slot[outer]):
                    return (f"'{outer}' would be folded into the weight of '{host_name}' under '{inner}', which acts "
                            f"{'on the input after' if _on_input(slot[inner]) else 'on the output before'} it "
                            f"unmerged and does not commute with it: merge '{inner}' too (or first)")
    unmerged_inputs = [n for n in order if _on_input(slot[n]) and n not in merged]
    reading = [n for n in stack if not _on_input(slot[n]) and slot[n].reads_input]
    if unmerged_inputs and reading:
        return (f"'{reading[0]}' reads the input of '{host_name}' untransformed, but merged it would see the input "
                f"transformed by '{unmerged_inputs[0]}', which is not merged: merge '{unmerged_inputs[0]}' too")
    for name in order:
        if not slot[name].reads_base:
            continue
        if name not in merged and stack:
            return (f"'{name}' ({type(slot[name]).__name__}) reads the base weight of '{host_name}', which would hold "
                    f"merged {stack}: merge '{name}' with them, or unmerge them")
        if name in merged and stack[0] != name:
            return (f"'{name}' ({type(slot[name]).__name__}) is computed on the pristine base weight of '{host_name}', "
                    f"but {stack[:stack.index(name)]} would be folded in before it: activate '{name}' first, or keep "
                    f"it unmerged")
    return None


def _hosts(model: nn.Module, registry: AdapterRegistry, names: Sequence[str]) -> Iterator[tuple[str, nn.Module, DeltaSlot]]:
    """(name, module, slot) of every host that any of `names` sits on, once each."""
    seen: set[str] = set()
    for name in names:
        for host_name in registry.hosts[name]:
            if host_name not in seen:
                seen.add(host_name)
                host = model.get_submodule(host_name)
                yield host_name, host, deltas_of(host)


def check(model: nn.Module, registry: AdapterRegistry, active: Sequence[str], merged: set[str], what: str) -> None:
    """Raise MergeError (naming the host and adapters) unless `merged` folded in gives the unmerged forward of `active`."""
    outside = sorted(merged - set(active))
    if outside:
        raise MergeError(f"{what}: adapters {outside} are merged into the base weights, so they act on every pass; "
                         f"keep them active, or unmerge them first")
    for name in sorted(merged):
        for host_name, host, slot in _hosts(model, registry, [name]):
            refusal = None if slot[name].merged else slot[name].merge_refusal(host)
            if refusal is not None:
                raise MergeError(f"{what}: cannot merge adapter '{name}' ({registry.configs[name].method}) into "
                                 f"'{host_name or 'the model'}': {refusal}")
    for host_name, host, slot in _hosts(model, registry, list(dict.fromkeys([*active, *merged]))):
        reason = _conflict(slot, host_name, active, merged)
        if reason is not None:
            raise MergeError(f"{what}: {reason}")
    reason = _subtree_conflict(model, registry, active, merged)
    if reason is not None:
        raise MergeError(f"{what}: {reason}")


def _under(host_name: str, names: Iterable[str]) -> bool:
    """Whether module `host_name` is one of `names` or sits below one ("" is the whole model)."""
    return any(not name or host_name == name or host_name.startswith(f"{name}.") for name in names)


@contextmanager
@torch.no_grad()
def unfolded(model: nn.Module, registry: AdapterRegistry, host_names: Iterable[str]) -> Iterator[None]:
    """These modules and the modules below them with nothing folded in, for code that reads or rewrites their
    weights (attaching: PiSSA's SVD, DoRA's norm, a head copy; removing: PiSSA's restore; loading: bias changes
    and base-tensor checks; saving a merged head copy); everything is folded back afterwards."""
    names = list(host_names)
    popped: list[tuple[nn.Module, Delta, dict[str, torch.Tensor] | None]] = []
    for host_name, stack in registry.merge_stacks.items():
        if _under(host_name, names):
            host = model.get_submodule(host_name)
            slot = deltas_of(host)
            popped += [(host, slot[name], _pop(host, slot[name])) for name in reversed(stack)]
    try:
        yield
    finally:
        for host, delta, snapshot in reversed(popped):
            _push(host, delta, snapshot)


def _subtree_conflict(model: nn.Module, registry: AdapterRegistry, active: Sequence[str], merged: set[str]) -> str | None:
    """Deltas that read or swap the weights of the modules below their own: a head copy, when merged, swaps its
    whole subtree; a delta that reads the base (LLaMA-Adapter's projections) needs it pristine while unmerged."""
    folded = {host_name for name in merged for host_name in registry.hosts[name]}
    for name in active:
        for host_name, _, slot in _hosts(model, registry, [name]):
            delta = slot[name]
            swaps = isinstance(delta, ModuleCopy) and name in merged
            if not (swaps or (delta.reads_base and name not in merged)):
                continue
            below = sorted(h for h in folded if h != host_name and _under(h, [host_name]))
            if below:
                what = "swaps the weights of" if swaps else "reads the base weights of"
                return (f"'{name}' ({type(delta).__name__}) on '{host_name or 'the model'}' {what} the modules "
                        f"below it, and {below[:3]} would hold merged adapters: merge or unmerge them apart")
    return None


@torch.no_grad()
def rewrite(model: nn.Module, registry: AdapterRegistry, active: Sequence[str], merged: set[str],
            changing: Sequence[str], what: str) -> None:
    """Bring every host of `changing` to the fold stack of (`active`, `merged`): pop down to the common part, push
    the rest. A fold that fails part-way is undone, host by host, before the error is raised."""
    stacks = dict(registry.merge_stacks)
    done: list[tuple[bool, nn.Module, Delta, dict[str, torch.Tensor] | None]] = []  # (pushed?, host, delta, snapshot)
    try:
        for host_name, host, slot in _hosts(model, registry, changing):
            stack = stacks.get(host_name, [])
            target = [name for name in fold_order(slot, active) if name in merged]
            keep = 0
            while keep < min(len(stack), len(target)) and stack[keep] == target[keep]:
                keep += 1
            for name in reversed(stack[keep:]):
                done.append((False, host, slot[name], _pop(host, slot[name])))
            for name in target[keep:]:
                _push(host, slot[name])
                done.append((True, host, slot[name], None))
            stacks[host_name] = target
    except BaseException as err:
        for pushed, host, delta, snapshot in reversed(done):
            if pushed:
                _pop(host, delta)
            else:
                _push(host, delta, snapshot)
        if isinstance(err, Exception):
            raise MergeError(f"{what}: folding failed and every host was put back as it was: {err!r}") from err
        raise
    registry.merge_stacks = {host_name: stack for host_name, stack in stacks.items() if stack}


def _push(host: nn.Module, delta: Delta, snapshot: dict[str, torch.Tensor] | None = None) -> None:
    """Fold the delta in (as it was at `snapshot`, when putting back a pop), remembering its tensors."""
    if snapshot is None and not isinstance(delta, ModuleCopy):  # a swap undoes itself exactly
        snapshot = _tensors(delta)
    delta.merge_snapshot = snapshot
    delta.host_state_before_merge = stored_state(host)
    with _as_when_merged(delta):
        delta.merge_into(host)
    delta.merged = True


def _pop(host: nn.Module, delta: Delta) -> dict[str, torch.Tensor] | None:
    """Unfold the delta with the tensors it was folded in with; returns them."""
    with _as_when_merged(delta):
        delta.unmerge_from(host)
    if delta.host_state_before_merge is not None:  # a quantized weight: put back what was stored, not Q(W − ΔW)
        host.restore_state(delta.host_state_before_merge)
    snapshot, delta.merge_snapshot, delta.merged = delta.merge_snapshot, None, False
    delta.host_state_before_merge = None
    return snapshot


def _state(delta: Delta) -> dict[str, torch.Tensor]:
    """The delta's parameters and buffers by name: what its fold is computed from."""
    return dict([*delta.named_parameters(), *delta.named_buffers()])


def _tensors(delta: Delta) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in _state(delta).items()}


@contextmanager
def _as_when_merged(delta: Delta) -> Iterator[None]:
    """Give the delta back the tensors it had when merged (if it changed since: training, a pruned rank)."""
    snapshot = delta.merge_snapshot or {}
    current = _state(delta)
    changed = {name: current[name].data for name, saved in snapshot.items()
               if name in current and (current[name].shape != saved.shape or not torch.equal(current[name], saved))}
    for name in changed:
        current[name].data = snapshot[name]
    try:
        yield
    finally:
        for name, data in changed.items():
            current[name].data = data
