"""LoRA's sibling layers that read the same input (q, k, v; gate, up) project it down as one matmul.

Each member delta exposes `down_weight()` of shape (r_i, in). The first member called with an
input computes `x @ cat(W_1..W_n)ᵀ` once; the others reuse their slice. The cache is keyed by
the input's storage, shape, strides and version *and* by the weights' versions, and holds a
reference to the input, so a stale projection can never be served (a freed tensor's memory
cannot be reused while we hold it; an optimizer step bumps the weights' versions).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ...core.routing import tensor_version


class DownProjecting(Protocol):
    shared: SharedInputGroup | None

    def down_weight(self) -> torch.Tensor: ...


class SharedInputGroup:
    def __init__(self, members: list[DownProjecting]):
        assert len(members) > 1, "a group needs at least two members"
        self.members = members
        self._key: tuple | None = None
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()
        self._pending = 0

    def project(self, member: DownProjecting, x: torch.Tensor) -> torch.Tensor:
        weights = [m.down_weight() for m in self.members]
        key = (x.data_ptr(), x.shape, x.stride(), tensor_version(x), x.device, tuple(tensor_version(w) for w in weights))
        if key != self._key or self._pending == 0:
            self._key, self._input = key, x
            sizes = [w.shape[0] for w in weights]
            self._parts = F.linear(x, torch.cat(weights)).split(sizes, dim=-1)  # [..., sum r_i]
            self._pending = len(self.members)
        # found by identity, not id(): ids change when the model is deep-copied
        part = self._parts[next(i for i, m in enumerate(self.members) if m is member)]
        self._pending -= 1
        if self._pending == 0:  # every member served: let the activation go
            self._key, self._input, self._parts = None, None, ()
        return part


def link_siblings(deltas: dict[str, DownProjecting]) -> None:
    """Give the deltas of one adapter on sibling modules (one parent) of equal input width a shared group each;
    `deltas` maps host names to the deltas that may share."""
    groups: dict[tuple[str, int], list[DownProjecting]] = {}
    for host_name, delta in deltas.items():
        groups.setdefault((host_name.rpartition(".")[0], delta.down_weight().shape[1]), []).append(delta)
    for members in groups.values():
        if len(members) > 1:
            group = SharedInputGroup(members)
            for delta in members:
                delta.shared = group
