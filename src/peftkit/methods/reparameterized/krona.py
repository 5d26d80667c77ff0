"""KronA: Parameter-Efficient Tuning with Kronecker Adapter (Edalati et al., 2022, arXiv:2212.10650).

    h = W0 x + s · (A ⊗ B) x,   A ∈ R^{a1×a2},  B ∈ R^{(out/a1)×(in/a2)}

W0 stays frozen; A and B train. ΔW = s·(A ⊗ B) can have full rank (rank A · rank B) with only
a1·a2 + out·in/(a1·a2) parameters. B starts at zero, so a fresh adapter is a no-op. The forward
pass never builds ΔW: with x viewed as X ∈ R^{a2×(in/a2)} (row-major), (A ⊗ B) x = vec(A X Bᵀ)
(the paper writes the column-major form vec(B X Aᵀ)). Merging uses torch.kron.

Hosts: Linear and GPT-2's Conv1D.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field, PositiveInt
from torch import nn

from ...core.config import AdapterConfig, register_method
from ...core.delta import Delta
from ...core.hosts import LINEAR_TYPES, host_shape


@register_method
class KronA(AdapterConfig):
    """KronA config: the shape of the small factor A (which fixes B's) and the scale s."""

    method: ClassVar[str] = "krona"
    a_shape: tuple[PositiveInt, PositiveInt] = Field((16, 16), description="(a1, a2): a1 divides out, a2 divides in")
    scale: float = Field(1.0, gt=0, description="s in ΔW = s·(A ⊗ B)")

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def build(self, host: nn.Module) -> "KronADelta":
        return KronADelta(host, self)


class KronADelta(Delta):
    """One Kronecker pair on one host: increment(x) = s · (A ⊗ B) x."""

    def __init__(self, host: nn.Module, config: KronA):
        super().__init__()
        shape = host_shape(host)
        a1, a2 = config.a_shape
        if shape.out_features % a1 or shape.in_features % a2:
            raise ValueError(f"a_shape {config.a_shape} does not divide the weight shape (out, in) = "
                             f"({shape.out_features}, {shape.in_features}): a1 must divide out and a2 must divide in")
        self.scaling = config.scale
        # Adapter weights stay float32 on a half-precision base, as LoRA's do.
        factory = {"dtype": torch.float32, "device": host.weight.device}
        self.krona_A = nn.Parameter(torch.empty(a1, a2, **factory))  # [a1, a2]
        self.krona_B = nn.Parameter(torch.zeros(shape.out_features // a1, shape.in_features // a2, **factory))  # [b1, b2]
        nn.init.kaiming_uniform_(self.krona_A, a=math.sqrt(5))

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        (a1, a2), (b1, b2) = self.krona_A.shape, self.krona_B.shape
        rows = x.to(self.krona_A.dtype).reshape(*x.shape[:-1], a2, b2)  # [..., in] -> [..., a2, b2]: X
        y = self.krona_A @ (rows @ self.krona_B.T)  # [a1, a2] @ [..., a2, b1] -> [..., a1, b1]: A X Bᵀ
        return y.reshape(*x.shape[:-1], a1 * b1) * self.scaling  # [..., out]

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.krona_A.float(), self.krona_B.float()) * self.scaling  # [out, in]
