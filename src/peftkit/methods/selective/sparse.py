"""The layer every selective method shares: the change of a chosen subset of a host's own parameters.

    h = f(x; W0 + ΔW, b0 + Δb) = f(x; W0, b0) + f(x; ΔW, Δb)     (f linear in its parameters)

The base stays frozen and untouched. Each chosen host parameter gets a `ParamDiff` beside it
holding only the selected entries: fixed `indices` (a buffer) and trainable `values`. An
optimizer therefore only ever sees selected entries, so nothing outside the mask can move,
whatever AdamW's weight decay or momentum do (decay pulls the *change* toward zero, i.e. the
weight toward its pretrained value). Three storage forms, chosen by the mask:

- dense: the whole tensor is selected (BitFit's biases, LayerNorm, last-k blocks), `values` has
  the parameter's shape and there are no indices;
- elements: flat indices into the parameter (FishMask, PaFi, Child-Tuning_D), `values` is 1-D;
- slices: whole slices along one dimension (structured masks: attention heads, FFN rows), the
  indices pick positions along `dim` and `values` has the parameter's shape with that dim cut.

Indices address the host parameter in its own layout (GPT-2's Conv1D keeps (in, out)), so
merging is W.flatten()[indices] += values with no layout translation; unmerging restores the
saved original entries bit for bit. Files hold `indices` (int32) and `values`, so a saved
adapter costs 8 bytes per selected entry (4 for dense blocks).

The delta is applied as a transform of the host output (`out + f(x; ΔW, Δb)`), which serves
per-row routing (each routed row group adds its own sparse change) and works for a bias-only
change whose broadcast shape only the output knows. Hosts: Linear, GPT-2 Conv1D, Conv2d,
Embedding, LayerNorm. How f(x; ΔW) is computed depends on the storage form (V: `values`):

- slices of a Linear / Conv1D weight: whole output rows add out[..., idx] += x Vᵀ, whole input
  columns add x[..., idx] Vᵀ (V in (out, in) orientation); forward and backward cost only the
  selected share of a matmul, and no weight-sized ΔW exists;
- elements of a Linear / Conv1D weight: at most min(in, out) entries add out[..., r] += x[..., c]·v
  per entry (r, c) by gathers; more, up to `SPARSE_MAX_DENSITY` of the weight, make ΔW a CSR matrix
  over fixed index patterns (built once per mask), forward and dX are sparse × dense products and
  dV is gᵀx sampled at the selected entries (`torch.sparse.sampled_addmm`), so neither the dense
  ΔW nor the dense gᵀx is formed; frozen Fish-Dip entries ride along in both;
- everything else (dense blocks, denser element masks, Conv2d, Embedding, LayerNorm): ΔW as a
  tensor of the parameter's shape (zeros with the entries scattered in, differentiable in V) and
  one more call of the host's function on it.

In an un-routed pass over a batch whose activations outweigh the weight (training, batched
inference), a Linear / Conv1D host instead runs once on W0 + ΔW (`host_call`, one copy of W0
with the entries added): forward and dx cost what the bare host costs, and only dV is extra,
gᵀx picked at the entries: for element masks up to `COLUMN_DOTS_MAX_DENSITY`, one dot of a column of g
with a column of x per entry (`core.kernels.column_dots`, which transposes 64 rows at a time in cache);
denser masks take the dense gᵀx and gather it; the selected rows or columns of slices; all of it for
dense blocks. Without that kernel (no C compiler, `PEFTKIT_COMPILE=0`) element masks follow the density
rules above (per entry, sampled at the mask on transposed copies from `core.kernels.transposed`, dense).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.hosts import LINEAR_TYPES, Conv1D, RMSNormLike
from ...core.kernels import column_dots, transposed

SPARSE_HOST_TYPES: tuple[type[nn.Module], ...] = LINEAR_TYPES + (nn.Conv2d, nn.Embedding, nn.LayerNorm, RMSNormLike)
# Element masks of a Linear / Conv1D weight up to this share of its entries run as sparse products; above it,
# ΔW as a dense tensor is faster (CPU, batch 2048 x 384..1536: the CSR products cost about one dense matmul
# each at 15% and less than half of one at 5%).
SPARSE_MAX_DENSITY = 0.1
# In a folded call, element masks up to this share of a weight take their values' gradient from `core.kernels.
# column_dots`; above it the dense gᵀx is faster (CPU, 2048 rows x 384..1536: the two are even at ~13-15%).
COLUMN_DOTS_MAX_DENSITY = 0.12


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


class _SparseProduct(torch.autograd.Function):
    """x ΔWᵀ for x [rows, in] and a sparse ΔW (out, in) holding `values` on a CSR layout:

        y = (ΔW xᵀ)ᵀ,   dx = (ΔWᵀ gᵀ)ᵀ,   dvalues_k = Σ_rows g[:, out_k] x[:, in_k]   (gᵀx sampled at the mask)

    CPU kernels are fast only for a sparse matrix on the left and dense operands stored transposed ([in, rows],
    [out, rows]), so xᵀ and gᵀ are made contiguous once (`transposed`: a compiled copy, several times torch's
    eager one); xᵀ, not x, is kept for backward (the same memory).
    Results are transposed back to contiguous [rows, ·] before anything adds them (mixed-layout adds are slow).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, layout: CsrLayout) -> torch.Tensor:
        x_t = transposed(x)
        ctx.save_for_backward(x_t, values)
        ctx.layout = layout
        with torch.autocast(x.device.type, enabled=False):  # the sparse kernels have no bfloat16 form
            return transposed(layout.matrix(values) @ x_t)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_t, values = ctx.saved_tensors
        layout: CsrLayout = ctx.layout
        grad_t = transposed(grad)
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            dx = transposed(layout.matrix(values, transposed=True) @ grad_t)
        if ctx.needs_input_grad[1]:
            sampled = torch.sparse.sampled_addmm(layout.matrix(values), grad_t, x_t.t(), beta=0).values()
            dvalues = torch.empty_like(values).index_copy_(0, layout.order, sampled)
        return dx, dvalues, None


def element_path(count: int, shape: torch.Size) -> Literal["entries", "sparse", "dense"]:
    """How `count` scattered entries of a Linear / Conv1D weight are computed: one product per entry (at most
    min(in, out): a few gathers beat the sparse kernels' fixed costs), sparse kernels (up to
    `SPARSE_MAX_DENSITY`), or one dense matmul."""
    if count <= min(shape):
        return "entries"
    return "sparse" if count <= SPARSE_MAX_DENSITY * shape.numel() else "dense"


def _coordinates(indices: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) positions of flat indices into a 2-D parameter, in its own layout."""
    return indices // shape[1], indices % shape[1]


def folds_into_weight(rows: int, shape: torch.Size) -> bool:
    """Whether a pass over `rows` input rows runs a Linear / Conv1D host once on W0 + ΔW: when its activations,
    rows·(in + out), outweigh the weight-sized copy that costs, in·out (a training batch does, a decoding step not)."""
    return rows * (shape[0] + shape[1]) >= shape[0] * shape[1]


@dataclass(frozen=True, eq=False)
class _Fold:
    """A Linear / Conv1D host with its diffs folded in: f(x; W0 + ΔW, b0 + Δb) and the gradients of that call."""

    weight: torch.Tensor  # W0, in the host's layout
    bias: torch.Tensor | None
    weight_diff: ParamDiff | None  # None: the weight is not changed
    bias_diff: ParamDiff | None
    in_out: bool  # the host stores W as (in, out), as Conv1D

    def linear_weight(self) -> torch.Tensor:
        """W0 + ΔW in Linear orientation (out, in); recomputed for backward rather than kept."""
        weight = self.weight if self.weight_diff is None else self.weight_diff.added_to(self.weight)
        return weight.t() if self.in_out else weight

    def call(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.bias_diff is None else self.bias_diff.added_to(self.bias)
        return F.linear(x, self.linear_weight(), bias)

    def weight_grad(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """dV: the gradient of W (aᵀb in the host's layout) at the diff's trainable entries only, for x [rows, in]
        and grad [rows, out]. Element masks up to `COLUMN_DOTS_MAX_DENSITY` take one dot per entry (`column_dots`);
        otherwise, or without that kernel, the output hook's density rules decide how it is computed."""
        diff = self.weight_diff
        a, b = (x, grad) if self.in_out else (grad, x)
        if diff.dim is not None:  # slices: the selected rows or columns of aᵀb
            if diff.dim == 0:
                return a.index_select(1, diff.indices).t() @ b
            return a.t() @ b.index_select(1, diff.indices)
        if diff.is_elements and diff.values.numel() <= COLUMN_DOTS_MAX_DENSITY * diff.shape.numel():
            dots = column_dots(a, b, *_coordinates(diff.indices, diff.shape))
            if dots is not None:
                return dots
        path = element_path(diff.values.numel(), diff.shape) if diff.is_elements else "dense"
        if path == "entries":
            first, second = _coordinates(diff.indices, diff.shape)
            return (a.index_select(1, first) * b.index_select(1, second)).sum(0)
        if path == "sparse":
            layout = diff.csr_layout(self.in_out, frozen=False)  # both operands transposed: each entry one contiguous dot
            sampled = torch.sparse.sampled_addmm(layout.matrix(diff.values.detach()), transposed(grad),
                                                 transposed(x).t(), beta=0).values()
            return torch.empty_like(diff.values).index_copy_(0, layout.order, sampled)
        return diff.pick(a.t() @ b)


class _FoldedCall(torch.autograd.Function):
    """y = f(x; W0 + ΔW, b0 + Δb) in one host call, for x [rows, in]:

        dx = g (W0 + ΔW),   dV = (gᵀx) at the trainable entries,   dΔb = (Σ_rows g) at the entries

    Rows in, rows out: the caller shapes them, so the output is no view made inside the function and the
    deltas after it may add to it in place.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_values: torch.Tensor | None, bias_values: torch.Tensor | None,
                fold: _Fold) -> torch.Tensor:
        ctx.fold = fold
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None)  # only dV reads x
        return fold.call(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        fold: _Fold = ctx.fold
        dx = grad @ fold.linear_weight() if ctx.needs_input_grad[0] else None
        dweight = fold.weight_grad(x, grad) if ctx.needs_input_grad[1] else None
        dbias = fold.bias_diff.pick(grad.sum(0)) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None


class SparseDelta(Delta):
    """The selected changes of one host's parameters: transform(x, out) = out + f(x; ΔW, Δb).

    Built unselected (`selected` False) by data-driven methods; `install` sets the masks.
    """

    additive = False
    adds_term = True  # out + f(x; ΔW) + Δb: it commutes with the other increments on its host (core.merging)

    def __init__(self, host: nn.Module, param_names: tuple[str, ...], masks: dict[str, Mask] | None = None):
        super().__init__()
        present = tuple(n for n in param_names if isinstance(getattr(host, n, None), nn.Parameter))
        if not present:
            raise ValueError(f"{type(host).__name__} has none of the parameters {list(param_names)}")
        if isinstance(host, nn.Embedding) and host.max_norm is not None:
            raise ValueError("an Embedding with max_norm renormalises its weight in place; a sparse change cannot follow it")
        self.param_names = present
        self.kind = _host_kind(host)
        self.folds_into_host = self.kind in ("linear", "conv1d")
        self._host_args = _host_args(host, self.kind)
        self._shapes = {n: getattr(host, n).shape for n in present}
        self._device = getattr(host, present[0]).device
        self.scoring = False  # set while Fisher scores are computed: the delta must not change outputs
        self._merged: dict[str, tuple[torch.Tensor, ...]] = {}  # per parameter: (indices, entries before, after)
        self.install(masks or {})
        self.selected = masks is not None

    def diffs(self) -> Iterator[tuple[str, ParamDiff]]:
        for name in self.param_names:
            yield name, getattr(self, name)

    def install(self, masks: dict[str, Mask]) -> None:
        """Replace every diff by a zero one on the given masks (parameters not named get an empty mask)."""
        unknown = sorted(set(masks) - set(self.param_names))
        if unknown:
            raise MaskError(f"masks for parameters this delta does not adapt: {unknown} (it adapts {list(self.param_names)})")
        for name in self.param_names:
            shape = self._shapes[name]
            setattr(self, name, ParamDiff(shape, self._device, masks.get(name, EMPTY).checked(shape, name)))
        self.selected = True

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.selected:
            if self.scoring:  # Fisher scores of an unselected adapter are taken at the base weights
                return out
            raise MaskNotSelectedError("this selective adapter has no mask yet: choose one with peftkit.select(model, "
                                       "name, batches) before running or training it")
        weight, bias = getattr(self, "weight", None), getattr(self, "bias", None)
        if weight is not None and weight.size():
            out = self._add_weight_term(x, weight, out)
        if bias is not None and bias.size():
            db = bias.dense()
            out = out + (db.view(-1, 1, 1) if self.kind == "conv2d" else db).to(out.dtype)
        return out

    def host_call(self, host: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """f(x; W0 + ΔW, b0 + Δb) as one call of a Linear / Conv1D host, when this pass folds: a batch that
        `folds_into_weight`, no autocast, one dtype throughout, and a frozen base (Fisher scoring takes
        gradients of the base weights, which the folded call does not give)."""
        if not self.selected or torch.is_autocast_enabled(x.device.type):
            return None
        diffs = {name: diff for name, diff in self.diffs() if diff.size()}
        base = [p for p in (host.weight, host.bias) if p is not None]
        if not diffs or any(p.requires_grad or p.dtype != x.dtype for p in base) or \
                any(not d.folds or d.values.dtype != x.dtype for d in diffs.values()):
            return None
        weight, bias = diffs.get("weight"), diffs.get("bias")
        if weight is not None and not folds_into_weight(x.numel() // x.shape[-1], weight.shape):
            return None
        fold = _Fold(host.weight, host.bias, weight, bias, self.kind == "conv1d")
        values = (None if diff is None else diff.values for diff in (weight, bias))
        out = _FoldedCall.apply(x.reshape(-1, x.shape[-1]), *values, fold)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _add_weight_term(self, x: torch.Tensor, diff: ParamDiff, out: torch.Tensor) -> torch.Tensor:
        """out + f(x; ΔW). On a Linear or Conv1D: slices cost only their rows or columns; scattered elements take
        their `element_path`: out[..., r] += x[..., c]·v per entry (r, c), or sparse products. Else ΔW as a tensor."""
        if self.kind in ("linear", "conv1d"):
            if diff.dim is not None:
                return self._add_slices(x, diff, out)
            if diff.is_elements and element_path(diff.size(), diff.shape) != "dense":
                return self._add_elements(x, diff, out)
        return out + self._weight_term(x, diff.dense()).to(out.dtype)

    def _add_elements(self, x: torch.Tensor, diff: ParamDiff, out: torch.Tensor) -> torch.Tensor:
        indices, values = diff.elements()
        x = x.to(values.dtype)
        if element_path(diff.size(), diff.shape) == "entries":  # the [rows, entries] product is no larger than x or out
            first, second = _coordinates(indices, diff.shape)
            read, write = (second, first) if self.kind == "linear" else (first, second)  # Conv1D keeps W as (in, out)
            return out.index_add(-1, write, (x.index_select(-1, read) * values).to(out.dtype))
        product = _SparseProduct.apply(x.reshape(-1, x.shape[-1]), values, diff.csr_layout(self.kind == "conv1d"))
        return out + product.view(out.shape).to(out.dtype)

    def _add_slices(self, x: torch.Tensor, diff: ParamDiff, out: torch.Tensor) -> torch.Tensor:
        """Whole output rows: out[..., idx] += x V^T; whole input columns: out += x[..., idx] V^T (V in (out, in))."""
        values = diff.values if self.kind == "linear" else diff.values.t()  # Conv1D keeps W as (in, out)
        writes_outputs = diff.dim == (0 if self.kind == "linear" else 1)
        x = x.to(values.dtype)
        if writes_outputs:
            return out.index_add(-1, diff.indices, F.linear(x, values).to(out.dtype))
        return out + F.linear(x.index_select(-1, diff.indices), values).to(out.dtype)

    def _weight_term(self, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
        """f(x; ΔW) without bias, in the host's own weight layout."""
        args = self._host_args
        if self.kind == "embedding":
            return F.embedding(x, dw, **args)
        x = x.to(dw.dtype)
        if self.kind == "linear":
            return F.linear(x, dw)
        if self.kind == "conv1d":
            return x @ dw
        if self.kind == "layernorm":
            return F.layer_norm(x, args["normalized_shape"], dw, None, args["eps"])
        if self.kind == "rmsnorm":  # Δw ⊙ x / rms(x), normalised in float32 as transformers' RMSNorms do
            eps = torch.finfo(x.dtype).eps if args["eps"] is None else args["eps"]
            return dw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        if args["pad"] is not None:
            x = F.pad(x, args["pad"][0], mode=args["pad"][1])
        return F.conv2d(x, dw, None, **args["conv"])

    @torch.no_grad()
    def merge_into(self, host: nn.Module) -> None:
        """W.flatten()[indices] += values, remembering the entries before and after for an exact unmerge."""
        for name, diff in self.diffs():
            flat = _flat_view(getattr(host, name))
            indices, values = diff.flat_change()
            before = flat[indices].clone()
            flat[indices] += values.to(flat.dtype)
            self._merged[name] = (indices, before, flat[indices].clone())

    @torch.no_grad()
    def unmerge_from(self, host: nn.Module) -> None:
        """Entries nobody touched since the merge get their old bits back; others (another adapter merged on top
        of the same entries) lose exactly what this merge added."""
        for name, _ in self.diffs():
            flat = _flat_view(getattr(host, name))
            indices, before, after = self._merged.pop(name)
            current = flat[indices]
            flat[indices] = torch.where(current == after, before, current - (after - before))

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": value for name, diff in self.diffs() for key, value in diff.saved().items()}

    def prepare_load(self, saved: dict[str, torch.Tensor]) -> None:
        """Take the file's masks: its indices (and slice dims) decide each diff's storage form and size."""
        masks = {}
        for name in self.param_names:
            dim = saved.get(f"{name}.slice_dim")
            masks[name] = Mask(saved.get(f"{name}.indices"), None if dim is None else int(dim))
        self.install(masks)


def _flat_view(param: torch.Tensor) -> torch.Tensor:
    if not param.is_contiguous():
        raise ValueError("a selective delta can only merge into a contiguous weight")
    return param.data.view(-1)


def _host_kind(host: nn.Module) -> str:
    if Conv1D is not None and isinstance(host, Conv1D):
        return "conv1d"
    for kind, cls in (("linear", nn.Linear), ("conv2d", nn.Conv2d), ("embedding", nn.Embedding), ("layernorm", nn.LayerNorm),
                      ("rmsnorm", RMSNormLike)):
        if isinstance(host, cls):
            return kind
    supported = ", ".join(t.__name__ for t in SPARSE_HOST_TYPES)
    raise TypeError(f"{type(host).__name__} is not a supported selective host (supported: {supported})")


def _host_args(host: nn.Module, kind: str) -> dict:
    """What f(x; ΔW) needs from the host besides its weight (conv geometry, norm shape, padding index)."""
    if kind == "embedding":
        return {"padding_idx": host.padding_idx}
    if kind == "layernorm":
        return {"normalized_shape": tuple(host.normalized_shape), "eps": host.eps}
    if kind == "rmsnorm":
        return {"eps": getattr(host, "variance_epsilon", getattr(host, "eps", None))}
    if kind == "conv2d":
        conv = {k: getattr(host, k) for k in ("stride", "padding", "dilation", "groups")}
        pad = None if host.padding_mode == "zeros" else (host._reversed_padding_repeated_twice, host.padding_mode)
        if pad is not None:
            conv["padding"] = 0
        return {"conv": conv, "pad": pad}
    return {}


class SelectiveConfig(AdapterConfig):
    """Base of the selective methods' configs: which host parameters are candidates, and their masks.

    A data-free method (BitFit, PaFi) overrides `masks` to choose at attach; a data-driven one leaves
    its deltas unselected until its masks are installed (FishMask: `FisherSelected` + `peftkit.select`).
    """

    param_names: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return SPARSE_HOST_TYPES

    def masks(self, hosts: dict[str, nn.Module]) -> dict[str, Mask] | None:
        """Masks keyed `<host>.<param>` chosen from the base alone, or None when data must choose."""
        return None

    def build_all(self, hosts: dict[str, nn.Module]) -> Iterator[Delta]:
        masks = self.masks(hosts)
        for host_name, host in hosts.items():
            yield self.make_delta(host, None if masks is None else masks_of(host_name, masks))

    def make_delta(self, host: nn.Module, masks: dict[str, Mask] | None) -> SparseDelta:
        """One host's delta on its masks (keyed by parameter name; None: unselected)."""
        return SparseDelta(host, self.param_names, masks)


def masks_of(host_name: str, masks: dict[str, Mask]) -> dict[str, Mask]:
    """The masks of one host, keyed by parameter name, from masks keyed `<host>.<param>`."""
    return {key.rpartition(".")[2]: mask for key, mask in masks.items() if key.rpartition(".")[0] == host_name}


def whole_masks(hosts: dict[str, nn.Module], param_names: tuple[str, ...]) -> dict[str, Mask]:
    """Every listed parameter each host has, whole (dense blocks: BitFit, LayerNorm, last-k)."""
    return {f"{name}.{param}": Mask.whole() for name, host in hosts.items()
            for param in param_names if isinstance(getattr(host, param, None), nn.Parameter)}
