"""f(x; ΔW) for an element mask of a Linear / Conv1D weight without a dense ΔW: the output hook's paths.

At most min(in, out) entries add out[..., r] += x[..., c]·v per entry (r, c) by gathers; more, up to
`SPARSE_MAX_DENSITY` of the weight, make ΔW a CSR matrix over fixed index patterns (`CsrLayout`, built once per
mask): forward and dX are sparse × dense products and dV is gᵀx sampled at the selected entries
(`torch.sparse.sampled_addmm`), so neither the dense ΔW nor the dense gᵀx is formed; frozen Fish-Dip entries ride
along in both. Denser masks take ΔW as a tensor (`element_path` chooses).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch.autograd.function import once_differentiable

from .kernels import transposed
from .param_diff import CsrLayout

# Element masks of a Linear / Conv1D weight up to this share of its entries run as sparse products; above it,
# ΔW as a dense tensor is faster (CPU, batch 2048 x 384..1536: the CSR products cost about one dense matmul
# each at 15% and less than half of one at 5%).
SPARSE_MAX_DENSITY = 0.1


class SparseProduct(torch.autograd.Function):
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


def coordinates(indices: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) positions of flat indices into a 2-D parameter, in its own layout."""
    return indices // shape[1], indices % shape[1]
