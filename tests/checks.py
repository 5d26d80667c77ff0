"""Shared checks: a routed mixed batch equals each row run alone; merge/unmerge round trips."""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

import peftkit

# Tests that compare with Hugging Face `peft` carry this mark: without peft only they skip (CI installs it, and
# fails on any skip), never a whole module of tests that do not need it.
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="Hugging Face peft is not installed")


def model_output(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The model's logits (or plain output) without autograd, for a dict of inputs or one tensor."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return getattr(out, "logits", out)


def row_alone(model: nn.Module, ids: torch.Tensor, row: int, name: str | None) -> torch.Tensor:
    """Row `row` of `ids` run on its own with adapter `name` (None: the bare base)."""
    if name is None:
        with peftkit.disabled(model):
            return model(ids[row:row + 1])[0]
    peftkit.activate(model, name)
    return model(ids[row:row + 1])[0]


def assert_routed_matches_rows(model: nn.Module, ids: torch.Tensor, rows: Sequence[str | None]) -> None:
    """The routed batch equals per-row runs, and the adapters really differ (so this cannot pass vacuously)."""
    with peftkit.routed(model, rows):
        mixed = model(ids)
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], row_alone(model, ids, row, name), rtol=1e-5, atol=1e-5)
    outs = [row_alone(model, ids, 0, name) for name in dict.fromkeys(rows)]
    assert all(not torch.allclose(a, b, atol=1e-4) for i, a in enumerate(outs) for b in outs[i + 1:])


def assert_routed_grads_match_rows(model: nn.Module, ids: torch.Tensor,
                                   rows: Sequence[str | None]) -> dict[str, torch.Tensor]:
    """Gradients of a routed batch equal the sum over rows run alone; returns the routed gradients."""
    with peftkit.routed(model, rows):
        model(ids).square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for row, name in enumerate(rows):
        if name is not None:  # the bare base row has no trainable path
            row_alone(model, ids, row, name).square().sum().backward()
    for n, p in model.named_parameters():
        if n in mixed:
            torch.testing.assert_close(mixed[n], p.grad, rtol=1e-4, atol=1e-5)
    return mixed


def assert_merge_roundtrip(model: nn.Module, ids: torch.Tensor, changed: str) -> None:
    """Merging keeps outputs and moves weight `changed`; unmerging restores every weight and output.

    Call with the adapter attached, active and randomised.
    """
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = model(ids)
    peftkit.merge(model)
    torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dict(model.named_parameters())[changed], before[changed])
    peftkit.unmerge(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)
