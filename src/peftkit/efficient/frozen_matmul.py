"""x Wᵀ for a frozen weight stored compressed, dequantized when needed and never kept:

    forward   y = x Wᵀ          W dequantized (in chunks of rows), used, dropped
    backward  dx = dy W         W dequantized again; no dW (the weight is frozen)

`F.linear(x, dequantize(W))` would have autograd keep the dequantized W until the backward, for every layer at
once: a float copy of the whole base during training, which is what quantizing it was meant to avoid. bitsandbytes'
4-bit matmul already works this way (it keeps the packed weight); the pure-torch hosts (grouped INT4, NF-k) and a
head tied to a quantized embedding table use this.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Rows = Callable[[slice], torch.Tensor]  # the dequantized rows W[chunk] (output features), float32


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rows: Rows, out_features: int, chunk_rows: int) -> torch.Tensor:
        ctx.rows, ctx.out_features, ctx.chunk_rows = rows, out_features, chunk_rows
        out = x.new_empty(*x.shape[:-1], out_features)
        for chunk in _chunks(out_features, chunk_rows):
            out[..., chunk] = x @ rows(chunk).to(x.dtype).T
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_x = None
        for chunk in _chunks(ctx.out_features, ctx.chunk_rows):
            part = grad[..., chunk] @ ctx.rows(chunk).to(grad.dtype)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None, None


def _chunks(size: int, step: int) -> list[slice]:
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]


def frozen_linear(x: torch.Tensor, rows: Rows, out_features: int, bias: torch.Tensor | None = None,
                  chunk_rows: int | None = None) -> torch.Tensor:
    """x Wᵀ (+ b) where `rows(chunk)` dequantizes W's rows `chunk`; W read `chunk_rows` rows at a time (default:
    all at once), in the forward and again in the backward, and not kept in between. The output has x's dtype
    (the bias is cast to it, as the rows are)."""
    out = _FrozenLinear.apply(x, rows, out_features, chunk_rows or out_features)
    return out + bias.to(out.dtype) if bias is not None else out
