"""The layer every selective method shares: the change of a chosen subset of a host's own parameters.

    h = f(x; W0 + ΔW, b0 + Δb) = f(x; W0, b0) + f(x; ΔW, Δb)     (f linear in its parameters)

The base stays frozen and untouched. Each chosen host parameter gets a `ParamDiff` beside it
holding only the selected entries: fixed `indices` (a buffer) and trainable `values`. An
optimizer therefore only ever sees selected entries, so nothing outside the mask can move,
whatever AdamW's weight decay or momentum do (decay pulls the *change* toward zero, i.e. the
weight toward its pretrained value). Which entries: a `Mask` (`mask.py`); how they are stored: `param_diff.py`.

Merging is W.flatten()[indices] += values with no layout translation (indices address the host parameter
in its own layout); unmerging restores the saved original entries bit for bit.

The delta is applied as a transform of the host output (`out + f(x; ΔW, Δb)`), which serves
per-row routing (each routed row group adds its own sparse change) and works for a bias-only
change whose broadcast shape only the output knows. Hosts: Linear, GPT-2 Conv1D, Conv2d,
Embedding, LayerNorm, RMSNorm. How f(x; ΔW) is computed depends on the storage form (V: `values`):

- slices of a Linear / Conv1D weight: whole output rows add out[..., idx] += x Vᵀ, whole input
  columns add x[..., idx] Vᵀ (V in (out, in) orientation); forward and backward cost only the
  selected share of a matmul, and no weight-sized ΔW exists;
- elements of a Linear / Conv1D weight: gathers per entry or sparse products (`products.py`);
- everything else (dense blocks, denser element masks, Conv2d, Embedding, LayerNorm): ΔW as a
  tensor of the parameter's shape (zeros with the entries scattered in, differentiable in V) and
  one more call of the host's function on it.

Its placement is HOST_CALL on a Linear / Conv1D: where a pass allows it, the host runs once on W0 + ΔW
(`folding.py`) instead of the host's call plus the delta's.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import AdapterConfig
from ...core.delta import Delta, Placement
from ...core.hosts import LINEAR_TYPES, Conv1D, RMSNormLike, edited_weight, read_weight
from .folding import Fold, FoldedCall, folds_into_weight
from .mask import EMPTY, Mask, MaskError, MaskNotSelectedError
from .param_diff import ParamDiff
from .products import SparseProduct, coordinates, element_path

SPARSE_HOST_TYPES: tuple[type[nn.Module], ...] = LINEAR_TYPES + (nn.Conv2d, nn.Embedding, nn.LayerNorm, RMSNormLike)


class SparseDelta(Delta):
    """The selected changes of one host's parameters: transform(x, out) = out + f(x; ΔW, Δb).

    Built unselected (`selected` False) by data-driven methods; `install` sets the masks.
    """

    additive = False
    adds_term = True  # out + f(x; ΔW) + Δb: it commutes with the other increments on its host (core.merging)
    trains_host_parameters = True

    def __init__(self, host: nn.Module, param_names: tuple[str, ...], masks: dict[str, Mask] | None = None):
        super().__init__()
        present = tuple(n for n in param_names if isinstance(getattr(host, n, None), nn.Parameter))
        if not present:
            raise ValueError(f"{type(host).__name__} has none of the parameters {list(param_names)}")
        if isinstance(host, nn.Embedding) and host.max_norm is not None:
            raise ValueError("an Embedding with max_norm renormalises its weight in place; a sparse change cannot follow it")
        self.param_names = present
        self.kind = _host_kind(host)
        self.placement = Placement.HOST_CALL if self.kind in ("linear", "conv1d") else Placement.OUTPUT
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
        base_weight, base_bias = read_weight(host), read_weight(host, "bias")
        base = [p for p in (base_weight, base_bias) if p is not None]
        if not diffs or any(p.requires_grad or p.dtype != x.dtype for p in base) or \
                any(not d.folds or d.values.dtype != x.dtype for d in diffs.values()):
            return None
        weight, bias = diffs.get("weight"), diffs.get("bias")
        if weight is not None and not folds_into_weight(x.numel() // x.shape[-1], weight.shape):
            return None
        fold = Fold(base_weight, base_bias, weight, bias, self.kind == "conv1d")
        values = (None if diff is None else diff.values for diff in (weight, bias))
        out = FoldedCall.apply(x.reshape(-1, x.shape[-1]), *values, fold)
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
            first, second = coordinates(indices, diff.shape)
            read, write = (second, first) if self.kind == "linear" else (first, second)  # Conv1D keeps W as (in, out)
            return out.index_add(-1, write, (x.index_select(-1, read) * values).to(out.dtype))
        product = SparseProduct.apply(x.reshape(-1, x.shape[-1]), values, diff.csr_layout(self.kind == "conv1d"))
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
            with edited_weight(host, name) as stored:
                flat = _flat_view(stored)
                indices, values = diff.flat_change()
                before = flat[indices].clone()
                flat[indices] += values.to(flat.dtype)
                self._merged[name] = (indices, before, flat[indices].clone())

    @torch.no_grad()
    def unmerge_from(self, host: nn.Module) -> None:
        """Entries nobody touched since the merge get their old bits back; others (another adapter merged on top
        of the same entries) lose exactly what this merge added."""
        for name, _ in self.diffs():
            with edited_weight(host, name) as stored:
                flat = _flat_view(stored)
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


def _flat_view(stored: torch.Tensor) -> torch.Tensor:
    if not stored.is_contiguous():
        raise ValueError("a selective delta can only merge into a contiguous weight")
    return stored.view(-1)


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

