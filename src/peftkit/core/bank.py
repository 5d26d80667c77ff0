"""Stacked banks: one host's per-adapter tensors of one delta type, stacked for routed batches without gradients.

Each stack is [1 + n, ...]: entry 0 is all zeros (rows of no adapter here), entry i holds one adapter's tensor in the
layout its batched kernel reads, with the adapter's inner width (LoRA's rank, a bottleneck's size) zero-padded to the
widest along the dimension the bank names. A method's `add_routed_batch_` gathers each row's entry by the row's
position and runs one batched matmul for the whole batch (`Delta.new_bank` makes the bank, the slot keeps it); `rows`
keeps that gather for the latest rows, which a decoding batch keeps for many steps.

An adapter is copied in when first routed to the host and stays; its entry is rewritten when its delta or tensors
change (another object, new storage, an in-place change, another scalar setting), so stale weights are never served;
a removed adapter's place is reused, and the stacks grow by doubling. A moved model (device, dtype) or stacks made
under inference mode, read outside it, start the bank afresh.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .delta import Delta, DeltaBank
from .routing import tensor_version

Stamp = tuple[object, ...]


def padded(tensor: torch.Tensor, dim: int | None, width: int) -> torch.Tensor:
    """`tensor` zero-padded at the end of `dim` to `width` (differentiable; as it is when `dim` is None)."""
    if dim is None or tensor.shape[dim] == width:
        return tensor
    return F.pad(tensor, (0, 0) * (tensor.dim() - 1 - dim) + (0, width - tensor.shape[dim]))


@dataclass(eq=False)
class _Entry:
    """Where a delta's tensors sit in the stacks, and the stamp of its sources when copied there."""

    position: int
    delta: Delta
    stamp: Stamp
    storage: tuple[torch.Tensor, ...]  # keeps the sources' memory from being reused at the same address


class StackedBank(DeltaBank):
    """The stacks of one host's deltas of one type (the module docstring). A subclass says what is stacked:
    `entry` (a delta's tensors in stack layout), `padded_dims` (per tensor, the dimension of its inner width, None
    for none), `sources` (the parameters an entry is made from) and `settings` (the plain values it also depends on)."""

    padded_dims: ClassVar[tuple[int | None, ...]]

    @staticmethod
    def entry(delta: Delta) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @staticmethod
    def sources(delta: Delta) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @staticmethod
    def settings(delta: Delta) -> tuple[object, ...]:
        return ()

    def __init__(self) -> None:
        self.stacks: tuple[torch.Tensor, ...] | None = None
        self._entries: dict[str, _Entry] = {}
        self._free: list[int] = []  # positions of removed adapters and spare capacity
        self._positions: dict[tuple[str, ...], torch.Tensor] = {}  # the last set of names: their positions, then 0
        self._rows: tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]] | None = None  # (positions, which, rows)

    @classmethod
    def stacked(cls, deltas: Sequence[Delta]) -> tuple[torch.Tensor, ...]:
        """Fresh stacks of `deltas` in order after the zero entry (differentiable: the path with gradients)."""
        entries = [cls.entry(delta) for delta in deltas]
        width = max(cls._width(tensors) for tensors in entries)
        columns = zip(*([padded(t, dim, width) for t, dim in zip(tensors, cls.padded_dims)] for tensors in entries))
        return tuple(torch.stack([column[0].new_zeros(column[0].shape), *column]) for column in columns)

    @classmethod
    def _width(cls, tensors: tuple[torch.Tensor, ...]) -> int:
        return max(t.shape[dim] for t, dim in zip(tensors, cls.padded_dims) if dim is not None)

    @classmethod
    def _stamp(cls, delta: Delta) -> Stamp:
        """What changes when an entry's tensors would: the sources' storage (`.data =`, a moved model), their
        in-place version counters (optimizer steps, loads), and the settings."""
        return (*((t.data_ptr(), tensor_version(t)) for t in cls.sources(delta)), *cls.settings(delta))

    def discard(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            self._free.append(entry.position)
            self._positions.clear()
            self._rows = None

    def rows(self, positions: torch.Tensor, which: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each stack's entries for rows whose adapters are `which` (indices into `positions`, from `lookup`), kept
        for the latest rows: a decoding batch keeps its rows for many steps, and gathering wide entries every step
        costs more than the batched matmuls save."""
        kept = self._rows
        if kept is None or kept[0] is not positions or not torch.equal(kept[1], which):
            index = positions.index_select(0, which.to(positions.device))
            kept = self._rows = (positions, which, tuple(stack.index_select(0, index) for stack in self.stacks))
        return kept[2]

    @torch.no_grad()
    def lookup(self, deltas: dict[str, Delta]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(the stacks, the positions of `deltas` then 0), first bringing their entries up to date."""
        like = self.sources(next(iter(deltas.values())))[0]
        if (self.stacks is None or self.stacks[0].device != like.device or self.stacks[0].dtype != like.dtype
                or (self.stacks[0].is_inference() and not torch.is_inference_mode_enabled())):
            self._start(next(iter(deltas.values())))  # first use, a moved model, or stacks only inference mode may write
        for name, delta in deltas.items():
            entry = self._entries.get(name)
            if entry is None or entry.delta is not delta or entry.stamp != self._stamp(delta):
                self._copy_in(name, delta)
        key = tuple(deltas)
        positions = self._positions.get(key)
        if positions is None:
            places = [self._entries[name].position for name in key]
            positions = torch.tensor([*places, 0], device=self.stacks[0].device)
            self._positions = {key: positions}  # the latest set only: a serving batch's set changes as rows come and go
        return self.stacks, positions

    def _start(self, like: Delta) -> None:
        """Empty stacks (the zero entry only, inner width 0) for tensors like `like`'s."""
        self.stacks = tuple(t.new_zeros(1, *(0 if d == dim else size for d, size in enumerate(t.shape)))
                            for t, dim in zip(self.entry(like), self.padded_dims))
        self._entries, self._free, self._positions, self._rows = {}, [], {}, None

    def _copy_in(self, name: str, delta: Delta) -> None:
        self._rows = None
        tensors = self.entry(delta)
        width = max(self._width(tensors), self._width(tuple(stack[0] for stack in self.stacks)))
        self.stacks = tuple(padded(stack, None if dim is None else dim + 1, width)
                            for stack, dim in zip(self.stacks, self.padded_dims))
        entry = self._entries.pop(name, None)
        if entry is None:
            if not self._free:
                self._grow()
            self._positions.clear()
        position = self._free.pop() if entry is None else entry.position
        for stack, tensor, dim in zip(self.stacks, tensors, self.padded_dims):
            stack[position] = padded(tensor, dim, width)
        storage = tuple(t.detach() for t in self.sources(delta))
        self._entries[name] = _Entry(position, delta, self._stamp(delta), storage)

    def _grow(self) -> None:
        size = self.stacks[0].shape[0]
        self.stacks = tuple(torch.cat([stack, stack.new_zeros(size, *stack.shape[1:])]) for stack in self.stacks)
        self._free.extend(range(2 * size - 1, size - 1, -1))
