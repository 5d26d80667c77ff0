"""A Linear / Conv1D host run once on W0 + ΔW (`SparseDelta.host_call`): the folded call and its gradients.

In an un-routed pass over a batch whose activations outweigh the weight (training, batched inference), the
host runs on one copy of W0 with the entries added: forward and dx cost what the bare host costs, and only dV is
extra, gᵀx picked at the entries: the selected rows or columns of slices; all of it for dense blocks; for element
masks, by `products.element_path`: one product per entry (few entries), gᵀx sampled at the mask on transposed
copies (up to `SPARSE_MAX_DENSITY`), or the dense gᵀx, gathered.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .kernels import transposed
from .param_diff import ParamDiff
from .products import coordinates, element_path


def folds_into_weight(rows: int, shape: torch.Size) -> bool:
    """Whether a pass over `rows` input rows runs a Linear / Conv1D host once on W0 + ΔW: when its activations,
    rows·(in + out), outweigh the weight-sized copy that costs, in·out (a training batch does, a decoding step not)."""
    return rows * (shape[0] + shape[1]) >= shape[0] * shape[1]


@dataclass(frozen=True, eq=False)
class Fold:
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
        and grad [rows, out]. Element masks follow the output hook's density rules (`element_path`)."""
        diff = self.weight_diff
        a, b = (x, grad) if self.in_out else (grad, x)
        if diff.dim is not None:  # slices: the selected rows or columns of aᵀb
            if diff.dim == 0:
                return a.index_select(1, diff.indices).t() @ b
            return a.t() @ b.index_select(1, diff.indices)
        path = element_path(diff.values.numel(), diff.shape) if diff.is_elements else "dense"
        if path == "entries":
            first, second = coordinates(diff.indices, diff.shape)
            return (a.index_select(1, first) * b.index_select(1, second)).sum(0)
        if path == "sparse":
            layout = diff.csr_layout(self.in_out, frozen=False)  # both operands transposed: each entry one contiguous dot
            sampled = torch.sparse.sampled_addmm(layout.matrix(diff.values.detach()), transposed(grad),
                                                 transposed(x).t(), beta=0).values()
            return torch.empty_like(diff.values).index_copy_(0, layout.order, sampled)
        return diff.pick(a.t() @ b)


class FoldedCall(torch.autograd.Function):
    """y = f(x; W0 + ΔW, b0 + Δb) in one host call, for x [rows, in]:

        dx = g (W0 + ΔW),   dV = (gᵀx) at the trainable entries,   dΔb = (Σ_rows g) at the entries

    Rows in, rows out: the caller shapes them, so the output is no view made inside the function and the
    deltas after it may add to it in place.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_values: torch.Tensor | None, bias_values: torch.Tensor | None,
                fold: Fold) -> torch.Tensor:
        ctx.fold = fold
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None)  # only dV reads x
        return fold.call(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        fold: Fold = ctx.fold
        dx = grad @ fold.linear_weight() if ctx.needs_input_grad[0] else None
        dweight = fold.weight_grad(x, grad) if ctx.needs_input_grad[1] else None
        dbias = fold.bias_diff.pick(grad.sum(0)) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None

