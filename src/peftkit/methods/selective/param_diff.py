"""The change of one host parameter: trainable `values` at fixed `indices`, in one of three storage forms.

- dense: the whole tensor is selected (BitFit's biases, LayerNorm, last-k blocks), `values` has
  the parameter's shape and there are no indices;
- elements: flat indices into the parameter (FishMask, PaFi, Child-Tuning_D), `values` is 1-D;
- slices: whole slices along one dimension (structured masks: attention heads, FFN rows), the
  indices pick positions along `dim` and `values` has the parameter's shape with that dim cut.

Indices address the host parameter in its own layout (GPT-2's Conv1D keeps (in, out)). Files hold
`indices` (int32) and `values`, so a saved adapter costs 8 bytes per selected entry (4 for dense blocks).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .mask import Mask


class ParamDiff(nn.Module):
    """The change of one host parameter: `values` at `indices` (or the whole tensor), zero elsewhere."""

    folds: ClassVar[bool] = True  # ΔW is `values` at the entries, so the host can run on W0 + ΔW (a gated change is not)

    def __init__(self, shape: torch.Size, device: torch.device, mask: Mask):
        super().__init__()
        self.shape = shape
        self.dim = mask.dim
        factory = {"dtype": torch.float32, "device": device}  # float32 changes on a half-precision base
        if mask.indices is None:
            self.indices = None
            self.values = nn.Parameter(torch.zeros(shape, **factory))
        else:
            self.register_buffer("indices", mask.indices.to(device))
            value_shape = (mask.indices.numel(),) if mask.dim is None else self._slice_shape(mask.indices.numel())
            self.values = nn.Parameter(torch.zeros(value_shape, **factory))
        if mask.dim is not None:
            self.register_buffer("slice_dim", torch.tensor(mask.dim))  # saved: tells slices from elements on load
        # Fish-Dip: entries trained earlier and since dropped from the mask keep their change, frozen.
        self.register_buffer("frozen_indices", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("frozen_values", torch.zeros(0, **factory), persistent=False)
        # with / without frozen entries: (index tensors, their versions, layout built from them)
        self._csr: dict[bool, tuple[tuple, tuple, CsrLayout]] = {}

    def _slice_shape(self, count: int) -> tuple[int, ...]:
        shape = list(self.shape)
        shape[self.dim] = count
        return tuple(shape)

    @property
    def is_dense(self) -> bool:
        return self.indices is None

    @property
    def is_elements(self) -> bool:
        return self.indices is not None and self.dim is None

    def elements(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices, values) of an element mask, frozen Fish-Dip entries included (differentiable in `values`)."""
        if not self.frozen_indices.numel():
            return self.indices, self.values
        return torch.cat([self.indices, self.frozen_indices]), torch.cat([self.values, self.frozen_values])

    def csr_layout(self, in_out: bool, frozen: bool = True) -> "CsrLayout":
        """The CSR layout of this element mask, frozen Fish-Dip entries included (in the order of `elements()`)
        unless `frozen` is False, rebuilt only when the index tensors change. `in_out`: the parameter is stored
        (in, out), as Conv1D's."""
        sources = (self.indices, self.frozen_indices) if frozen else (self.indices,)
        versions = tuple(t._version for t in sources)
        cached = self._csr.get(frozen)
        if cached is None or cached[1] != versions or any(a is not b for a, b in zip(cached[0], sources)):
            cached = self._csr[frozen] = sources, versions, CsrLayout.of(torch.cat(sources), self.shape, in_out)
        return cached[2]

    def size(self) -> int:
        """How many entries of the parameter this diff changes (frozen Fish-Dip entries included)."""
        return self.values.numel() + self.frozen_values.numel()

    def dense(self) -> torch.Tensor:
        """ΔW as a full tensor of the parameter's shape (differentiable in `values`)."""
        if self.indices is None:
            return self.values
        if self.dim is not None:
            return self.values.new_zeros(self.shape).index_copy(self.dim, self.indices, self.values)
        indices, values = self.elements()
        return self.values.new_zeros(self.shape.numel()).index_copy(0, indices, values).view(self.shape)

    def added_to(self, base: torch.Tensor) -> torch.Tensor:
        """base + ΔW as a new tensor, without forming ΔW (values only, no graph: the folded host call's weight)."""
        if self.indices is None:
            return base + self.values.detach()
        if self.dim is not None:
            return base.index_add(self.dim, self.indices, self.values.detach())
        indices, values = self.elements()
        return base.reshape(-1).index_add(0, indices, values.detach()).view(self.shape)

    def pick(self, full: torch.Tensor) -> torch.Tensor:
        """The trainable entries (shaped like `values`) of a tensor of the parameter's shape, e.g. its gradient."""
        if self.indices is None:
            return full
        if self.dim is not None:
            return full.index_select(self.dim, self.indices)
        return full.reshape(-1)[self.indices]

    def flat_change(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted flat indices, values) of every entry this diff changes, frozen ones included."""
        if self.indices is None:
            return torch.arange(self.shape.numel(), device=self.values.device), self.values.detach().flatten()
        if self.dim is not None:
            grid = torch.arange(self.shape.numel(), device=self.values.device).view(self.shape)
            return grid.index_select(self.dim, self.indices).flatten(), self.values.detach().flatten()
        indices, values = self.elements()
        order = indices.argsort()
        return indices[order], values.detach()[order]

    def saved(self) -> dict[str, torch.Tensor]:
        """The file form: dense values, or int32 indices + values (frozen Fish-Dip entries folded in)."""
        if self.indices is None:
            return {"values": self.values.detach()}
        index_type = torch.int32 if self.shape.numel() < 2**31 else torch.long  # half the bytes of int64 indices
        if self.dim is not None:
            return {"indices": self.indices.to(index_type), "values": self.values.detach(), "slice_dim": self.slice_dim}
        indices, values = self.flat_change()
        return {"indices": indices.to(index_type), "values": values}


@dataclass(frozen=True)
class CsrLayout:
    """An element mask as CSR patterns of ΔW in Linear orientation (out, in) and of ΔWᵀ: `order[k]` is the
    position in the values vector of the k-th stored entry, so the matrix holds `values[order]`."""

    shape: tuple[int, int]  # (out, in)
    crow: torch.Tensor
    col: torch.Tensor
    order: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    order_t: torch.Tensor

    @classmethod
    def of(cls, indices: torch.Tensor, shape: torch.Size, in_out: bool) -> "CsrLayout":
        first, second = indices // shape[1], indices % shape[1]
        rows, cols, size = (second, first, (shape[1], shape[0])) if in_out else (first, second, (shape[0], shape[1]))
        return cls(size, *_csr_pattern(rows, cols, size), *_csr_pattern(cols, rows, (size[1], size[0])))

    def matrix(self, values: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """ΔW (or ΔWᵀ) as a sparse CSR tensor holding `values`."""
        crow, col, order = (self.crow_t, self.col_t, self.order_t) if transposed else (self.crow, self.col, self.order)
        size = self.shape[::-1] if transposed else self.shape
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(crow, col, values[order], size, check_invariants=False)


def _csr_pattern(rows: torch.Tensor, cols: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """(crow, col, order) of the entries (rows[k], cols[k]) of a matrix of `size`."""
    order = (rows * size[1] + cols).argsort()
    crow = torch.zeros(size[0] + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=size[0]).cumsum(0)
    return crow, cols[order], order

