"""Routed encoder batches whose rows carry prompts of different lengths run as one pass per length.

Rows of an encoder never interact, so a routed batch mixing rows with a P-token prompt and rows
without one need not pad every row by P: the model's forward runs once per prompt length on that
bucket's rows (each under its own routing plan) and the outputs are put back in row order, padded
at the end ([virtual][real][pads], the encoder layout of `core.sequence`). Each row's outputs at
its own tokens equal running it alone, as in one padded pass; the batch costs the tokens it has.

Forward hooks on the root model run once, on the merged outputs. Only plain forward passes are
bucketed: a call with labels (one loss over the whole batch), a key/value cache, or attention
weights requested (their key layout differs between buckets) runs as one padded pass. The returned
outputs carry no key/value cache, which an encoder never continues. Installed on the model's
instance `forward` when a sequence adapter is attached to an encoder, and removed when the last
one is gone.
"""
from __future__ import annotations

import types
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


def prompt_widths(model: nn.Module, call: dict[str, Any], rows: list[Any]) -> list[int] | None:
    """Each row's prompt length when this call (bound, not yet rewritten) runs one pass per length, else None.
    `rows` are the rows' sequence deltas (None: none)."""
    installed = getattr(model.__dict__.get("forward"), "__func__", None) is _bucketed_forward
    if not installed or any(d is not None and d.causal for d in rows) or call.get("output_attentions") \
            or any(call.get(key) is not None for key in UNBUCKETED_ARGUMENTS):
        return None
    widths = [d.num_virtual_tokens if d is not None and d.kind == "prompt" else 0 for d in rows]
    return widths if len(set(widths)) > 1 else None


def _bucketed_forward(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    from .sequence import _bind, _rewrite_call, _row_deltas, _sequence_deltas  # that module installs this one

    forward = type(model).forward
    deltas = _sequence_deltas(model)
    if not deltas:  # the last sequence adapter is gone
        del model.__dict__["forward"]
        return forward(model, *args, **kwargs)
    registry: AdapterRegistry | None = model.__dict__.get(REGISTRY_ATTR)
    if registry is None or registry.plan is None or registry.disabled:
        return forward(model, *args, **kwargs)
    call = _bind(model, args, kwargs)
    x = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
    widths = None if x is None else prompt_widths(model, call, _row_deltas(registry, deltas, x.shape[0]))
    if widths is None:  # the pre-hook has rewritten this call for one padded pass
        return forward(model, *args, **kwargs)
    outer, batch = registry.plan, len(widths)
    plan = outer.for_rows(batch, "the model")
    parts = []
    try:
        for width in sorted(set(widths)):
            rows = torch.tensor([i for i, w in enumerate(widths) if w == width], device=x.device)
            registry.plan = RoutingPlan([plan.row_adapters[i] for i in rows.tolist()])
            sub_call = {k: v.index_select(0, rows) if _is_batched(v, batch) else v for k, v in call.items()}
            # the root's hooks ran once for the whole call; this bucket only needs its virtual tokens added
            rewritten = _rewrite_call(model, (), sub_call)
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
