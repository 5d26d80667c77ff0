"""Folding per-channel scales (and shifts) into a host's weight and bias: shared by (IA)³ and SSF.

A vector scaling the host's *output* channels folds as W ← diag(s) W, b ← s ⊙ b + t; one scaling
its *input* channels as W ← W diag(s). Unfolding divides, so a zero scale cannot be undone.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ...core.hosts import Conv1D, edited_weight

Axis = Literal["out", "in"]


def _weight_view(host: nn.Module, axis: Axis) -> tuple[int, ...]:
    """Shape that lays a per-channel vector along `axis` of `host.weight` (in the host's own layout)."""
    weight = host.weight
    if isinstance(host, nn.LayerNorm):  # weight is the normalised shape itself
        return tuple(weight.shape)
    dim = 0 if axis == "out" else 1
    if Conv1D is not None and isinstance(host, Conv1D):  # stores W as (in, out)
        dim = 1 - dim
    shape = [1] * weight.dim()
    shape[dim] = -1
    return tuple(shape)


def fold_refusal(host: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None = None) -> str | None:
    """Why `fold_` cannot fold these vectors into `host` (so that `unfold_` undoes it), or None."""
    if not bool((scale != 0).all()):
        return (f"the scale has {int((scale == 0).sum())} zero entries, so folding it into the weights could not be "
                "undone; keep this adapter unmerged")
    if shift is not None and host.bias is None:
        return f"a shift cannot be folded into a {type(host).__name__} without a bias; keep this adapter unmerged"
    return None


def _check_foldable(host: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None, what: str) -> None:
    refusal = fold_refusal(host, scale, shift)
    if refusal is not None:
        raise ValueError(f"{what}: {refusal}")


@torch.no_grad()
def fold_(host: nn.Module, scale: torch.Tensor, axis: Axis, shift: torch.Tensor | None = None) -> None:
    """W ← diag(s) W, b ← s ⊙ b + t (axis "out"); W ← W diag(s) (axis "in"). In place."""
    _check_foldable(host, scale, shift, "cannot merge")
    with edited_weight(host) as weight:
        weight.mul_(scale.reshape(_weight_view(host, axis)).to(weight.dtype))
    if axis == "out" and host.bias is not None:
        with edited_weight(host, "bias") as bias:
            bias.mul_(scale.reshape(bias.shape).to(bias.dtype))
            if shift is not None:
                bias.add_(shift.reshape(bias.shape).to(bias.dtype))


@torch.no_grad()
def unfold_(host: nn.Module, scale: torch.Tensor, axis: Axis, shift: torch.Tensor | None = None) -> None:
    """The inverse of `fold_`: b ← (b − t) / s, W ← W / s."""
    _check_foldable(host, scale, shift, "cannot unmerge")
    with edited_weight(host) as weight:
        weight.div_(scale.reshape(_weight_view(host, axis)).to(weight.dtype))
    if axis == "out" and host.bias is not None:
        with edited_weight(host, "bias") as bias:
            if shift is not None:
                bias.sub_(shift.reshape(bias.shape).to(bias.dtype))
            bias.div_(scale.reshape(bias.shape).to(bias.dtype))
