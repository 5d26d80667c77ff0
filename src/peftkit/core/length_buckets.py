"""Routed encoder batches whose rows need sequences of different lengths run as one pass per length.

Rows of an encoder never interact, so a routed batch need not pad every row to its longest: the model's forward runs
once per bucket of rows whose sequences have the same layout (each bucket under its own routing plan), and the
outputs are put back in row order, padded at the end of every dim; the batch costs the tokens it has. Two kinds of
delta give rows different layouts:
- prompts of different lengths before a text encoder's input (`core.sequence`), [virtual][real][pads] in the
  padded form. A call that cannot be bucketed (labels: one loss over the whole batch; a key/value cache; attention
  weights requested, whose key layout differs between buckets) runs as one padded pass, whose mask hides the pads;
- tokens inserted into a module's sequence (`core.tokens`, VPT's prompts): a bucket per insertion layout (where
  and how many). No mask reaches inserted positions, so there is no padded pass: such rows with labels or a cache
  in the call are an error naming the fix.
Each row's outputs at its own positions equal running it alone.

Forward hooks on the root model run once, on the merged outputs. The returned outputs carry no key/value cache,
which an encoder never continues. Installed on the model's instance `forward` when a prompt adapter (on an encoder)
or a token adapter is attached, and removed when the last one is gone.
"""
from __future__ import annotations

import types
from collections.abc import Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache

from .registry import REGISTRY_ATTR, AdapterRegistry
from .routing import RoutingPlan

UNBUCKETED_ARGUMENTS = ("labels", "past_key_values", "cache")  # a cache: "cache" from transformers 5.24 on


def install(model: nn.Module) -> None:
    """Route `model`'s calls through `_bucketed_forward` (once; not over another library's patched forward)."""
    if "forward" not in model.__dict__:
        model.forward = types.MethodType(_bucketed_forward, model)  # a bound method: deep copies rebind it


def _installed(model: nn.Module) -> bool:
    return getattr(model.__dict__.get("forward"), "__func__", None) is _bucketed_forward


def row_buckets(model: nn.Module, call: dict[str, Any]) -> list[Hashable] | None:
    """Each row's bucket when this call (bound, not yet rewritten) runs one pass per bucket, else None."""
    from .tokens import TokenError, row_insertions  # that module installs this one

    registry: AdapterRegistry | None = model.__dict__.get(REGISTRY_ATTR)
    if not _installed(model) or registry is None or registry.plan is None or registry.disabled:
        return None
    insertions = row_insertions(model, registry)
    unbucketed = [key for key in UNBUCKETED_ARGUMENTS if call.get(key) is not None]
    if len(set(insertions)) > 1 and unbucketed:
        raise TokenError(f"rows insert different tokens (VPT prompt counts), so they run one forward pass each, which "
                         f"cannot take {', '.join(unbucketed)}: compute the loss from the returned logits instead")
    widths = None if unbucketed else _prompt_widths(model, registry, call)
    keys = list(zip(widths or [0] * len(insertions), insertions))
    return keys if len(set(keys)) > 1 else None


def _prompt_widths(model: nn.Module, registry: AdapterRegistry, call: dict[str, Any]) -> list[int] | None:
    """Each row's prompt length when the rows' prompts may be bucketed (an encoder, no attention weights asked)."""
    from .sequence import _row_deltas, _sequence_deltas  # that module installs this one

    deltas = _sequence_deltas(model)
    x = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
    if not deltas or x is None or call.get("output_attentions"):
        return None
    rows = _row_deltas(registry, deltas, x.shape[0])
    if any(d is not None and d.causal for d in rows):
        return None
    return [d.num_virtual_tokens if d is not None and d.kind == "prompt" else 0 for d in rows]


def _bucketed_forward(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    from .sequence import _bind, _rewrite_call, _sequence_deltas  # that module installs this one
    from .tokens import token_adapters

    forward = type(model).forward
    registry: AdapterRegistry | None = model.__dict__.get(REGISTRY_ATTR)
    prompts = bool(_sequence_deltas(model))
    if not prompts and (registry is None or not token_adapters(registry)):  # the last prompt or token adapter is gone
        del model.__dict__["forward"]
        return forward(model, *args, **kwargs)
    call = _bind(model, args, kwargs)
    keys = row_buckets(model, call)
    if keys is None:  # one pass (the pre-hook has rewritten this call for its prompts)
        return forward(model, *args, **kwargs)
    outer, batch = registry.plan, len(keys)
    plan = outer.for_rows(batch, "the model")
    device = next(v.device for v in call.values() if _is_batched(v, batch))
    parts = []
    try:
        for key in sorted(set(keys)):
            rows = torch.tensor([i for i, k in enumerate(keys) if k == key], device=device)
            registry.plan = RoutingPlan([plan.row_adapters[i] for i in rows.tolist()])
            sub_call = {k: v.index_select(0, rows) if _is_batched(v, batch) else v for k, v in call.items()}
            # the root's hooks ran once for the whole call; this bucket only needs its virtual tokens added
            rewritten = _rewrite_call(model, (), sub_call) if prompts else None
            parts.append((rows, forward(model, **(sub_call if rewritten is None else rewritten[1]))))
            registry.plan.release()
    finally:
        registry.plan = outer
    return _merge(parts, batch)


def _is_batched(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _merge(parts: list[tuple[torch.Tensor, Any]], batch: int) -> Any:
    """The buckets' outputs as one batch's: row tensors padded at the end of every dim and put back in row order."""
    first = parts[0][1]
    if isinstance(first, torch.Tensor):
        return _merge_tensors(parts, batch)
    if isinstance(first, Cache) or first is None:
        return None
    if isinstance(first, tuple):
        return tuple(_merge([(rows, out[i]) for rows, out in parts], batch) for i in range(len(first)))
    if isinstance(first, dict):  # a ModelOutput: same class, merged fields
        return type(first)(**{key: _merge([(rows, out[key]) for rows, out in parts], batch) for key in first})
    raise TypeError(f"cannot merge per-bucket outputs of type {type(first).__name__}")


def _merge_tensors(parts: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> torch.Tensor:
    if any(out.dim() == 0 or out.shape[0] != len(rows) for rows, out in parts):
        raise TypeError("a per-bucket output has no row per input row; it cannot be merged into the batch's")
    shape = [max(out.shape[d] for _, out in parts) for d in range(1, parts[0][1].dim())]
    merged = parts[0][1].new_zeros(batch, *shape)
    for rows, out in parts:
        pad = [p for d in reversed(range(1, out.dim())) for p in (0, shape[d - 1] - out.shape[d])]
        merged.index_copy_(0, rows, F.pad(out, pad) if any(pad) else out)
    return merged
