"""LoKr: low-rank Kronecker product (Yeh et al., 2023, LyCORIS, arXiv:2309.14859; HF PEFT's LOKR).

    h = W0 x + s · (W1 ⊗ W2) x,   W1 ∈ R^{a×c},  W2 ∈ R^{b×d} (or W2a W2b, rank r),  out = a·b,  in = c·d,  s = α/r

(a, b) and (c, d) come from PEFT's `factorization(dim, decompose_factor)` of out and in (a ≤ b, c ≤ d; with
decompose_factor f > 0 dividing dim: (f, dim/f)), so files interchange with PEFT. As in PEFT, W2 is low-rank
(lokr_w2_a [b, r] · lokr_w2_b [r, d]) only when r < max(b, d)/2, and W1 too (lokr_w1_a · lokr_w1_b) only with
`decompose_both` and r < max(a, c)/2: a rank at or above those bounds gives the full factor, so no r is too large
for a host. Conv2d: W2 covers (b, d·kh·kw), or (b, d, kh, kw) when full, or with `use_effective_conv2d` PEFT's CP
form einsum(lokr_t2[r, r, kh, kw], lokr_w2_a[r, b], lokr_w2_b[r, d]). PEFT's init: W1 (or W1a) = 0, the rest
Kaiming-uniform, so ΔW = 0 at start. On Linear / Conv1D hosts the forward pass never builds ΔW: with x viewed
as X ∈ R^{c×d}, (W1 ⊗ W2) x = vec(W1 X W2ᵀ) (only the small W1, W2 are built); on Conv2d ΔW is built per
forward, as PEFT does. Tensors and fields as PEFT's LoKrConfig; shared parts: `lycoris.py`.
Hosts: Linear, GPT-2 Conv1D (peftkit format only: PEFT has no such LoKr layer), Conv2d.
"""
from __future__ import annotations

import math
import re
from typing import ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from ...core.config import register_method
from .lycoris import LycorisConfig, LycorisDelta


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension: PEFT's (and LyCORIS') rule, m ≤ n near √dimension, or m ≤ factor.

    With factor > 0 dividing dimension: (factor, dimension // factor) as they are (m may exceed n)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n  # fixed, as in PEFT
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@register_method
class LoKr(LycorisConfig):
    """LoKr config: rank of the low-rank factors, s = alpha/r, PEFT's factor split and options."""

    method: ClassVar[str] = "lokr"
    decompose_both: bool = Field(False, description="also make W1 low-rank (when r < max(a, c)/2)")
    decompose_factor: int = Field(-1, description="-1: split each dimension near its square root; f > 0: (f, dim/f)")
    rank_dropout_scale: bool = Field(False, description="rescale rows kept by rank_dropout by 1/mean")

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, value: int) -> int:
        if value != -1 and value <= 0:
            raise ValueError(f"decompose_factor must be -1 or a positive integer, got {value}")
        return value

    def build(self, host: nn.Module) -> "LoKrDelta":
        return LoKrDelta(host, self)

    peft_type: ClassVar[str] = "LOKR"
    _PEFT_KEY: ClassVar[re.Pattern] = re.compile(r"(.*)\.(lokr_(?:w[12](?:_[ab])?|t2))")
    _PEFT_FIELDS: ClassVar[tuple[str, ...]] = (*LycorisConfig._PEFT_FIELDS, "decompose_both", "decompose_factor",
                                               "rank_dropout_scale")


class LoKrDelta(LycorisDelta):
    """A Kronecker pair on one host: increment(x) = s · (W1 ⊗ W2) x."""

    def __init__(self, host: nn.Module, config: LoKr):
        super().__init__(host, config, rank_dropout_scale=config.rank_dropout_scale)
        r, kernel = config.r, self.kernel
        (a, b), (c, d) = (factorization(n, config.decompose_factor) for n in (self.out_features, self.in_features))
        new = lambda *shape: nn.Parameter(torch.empty(*shape, **self._factory))  # noqa: E731
        if config.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a, self.lokr_w1_b = new(a, r), new(r, c)
        else:
            self.lokr_w1 = new(a, c)
        if r >= max(b, d) / 2:
            self.lokr_w2 = new(b, d, *kernel)
        elif self.effective_conv:
            self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b = new(r, r, *kernel), new(r, b), new(r, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = new(b, r), new(r, d * math.prod(kernel))
        with torch.no_grad():  # PEFT's init: W1 (or W1a) zero, the rest Kaiming-uniform
            for name, p in self.named_parameters():
                nn.init.zeros_(p) if name in ("lokr_w1", "lokr_w1_a") else nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def _w1(self) -> torch.Tensor:
        return self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b  # [a, c]

    def _w2(self) -> torch.Tensor:
        if hasattr(self, "lokr_w2"):
            return self.lokr_w2  # [b, d(, kh, kw)]
        if hasattr(self, "lokr_t2"):
            return torch.einsum("ijkl,ip,jr->prkl", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)  # [b, d, kh, kw]
        return self.lokr_w2_a @ self.lokr_w2_b  # [b, d(·kh·kw)]

    def factor_weight(self) -> torch.Tensor:
        w1, w2 = self._w1(), self._w2()
        return torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - 2)), w2)  # [a·b, c·d(, kh, kw)] or [a·b, c·d·kh·kw]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv2d":
            return super()._product(x)
        w1, w2 = self._w1(), self._w2()  # [a, c], [b, d]
        rows = x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])  # [..., in] -> [..., c, d]: X
        return (w1 @ (rows @ w2.T)).reshape(*x.shape[:-1], self.out_features)  # vec(W1 X W2ᵀ)
