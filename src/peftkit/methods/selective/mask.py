"""Which entries of one host parameter a selective adapter changes: the whole tensor, flat elements, or slices."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class MaskError(ValueError):
    """A mask that does not fit its parameter: out-of-range or repeated indices, a missing parameter."""


class MaskNotSelectedError(RuntimeError):
    """A data-driven selective adapter used before its mask was chosen (call `peftkit.select` first)."""


@dataclass(frozen=True)
class Mask:
    """Which entries of one parameter an adapter changes: the whole tensor, flat elements, or slices."""

    indices: torch.Tensor | None = None  # None: the whole tensor
    dim: int | None = None  # None: flat element indices; d: whole slices along dimension d

    @classmethod
    def whole(cls) -> "Mask":
        return cls()

    @classmethod
    def elements(cls, indices: torch.Tensor) -> "Mask":
        return cls(indices=indices)

    @classmethod
    def slices(cls, dim: int, indices: torch.Tensor) -> "Mask":
        return cls(indices=indices, dim=dim)

    def checked(self, shape: torch.Size, what: str) -> "Mask":
        """This mask with sorted int64 indices, or a MaskError naming `what`; full coverage becomes `whole`."""
        if self.indices is None:
            return self
        if self.dim is not None and not 0 <= self.dim < len(shape):
            raise MaskError(f"{what}: slice dimension {self.dim} does not exist in a tensor of shape {tuple(shape)}")
        size = shape.numel() if self.dim is None else shape[self.dim]
        indices = torch.as_tensor(self.indices)
        if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise MaskError(f"{what}: mask indices must be a 1-D integer tensor, got {indices.dtype} of shape {tuple(indices.shape)}")
        indices = indices.to(torch.long).sort().values
        if indices.numel() and (indices[0] < 0 or indices[-1] >= size):
            raise MaskError(f"{what}: mask indices must lie in [0, {size}), got [{int(indices[0])}, {int(indices[-1])}]")
        if indices.numel() > 1 and bool((indices[1:] == indices[:-1]).any()):
            raise MaskError(f"{what}: mask indices repeat")
        if indices.numel() == size:
            return Mask.whole()
        return Mask(indices, self.dim)


EMPTY = Mask(torch.zeros(0, dtype=torch.long))  # nothing selected (yet)
