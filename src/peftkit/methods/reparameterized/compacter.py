"""Compacter: Efficient Low-Rank Hypercomplex Adapter Layers (Mahabadi et al., 2021, arXiv:2106.04647).

    h = W0 x + Σ_{i=1..n} (A_i ⊗ s_i t_i) x,   A_i ∈ R^{n×n} shared by all layers,  s_i ∈ R^{(out/n)×r},  t_i ∈ R^{r×(in/n)}

The paper's PHM parameterisation of a weight (ΔW = Σ A_i ⊗ B_i) applied as a frozen-base weight
delta: the "slow" rule matrices A_i are one tensor shared by every layer of the adapter, the
"fast" B_i = s_i t_i are per layer and low-rank (r = `phm_rank`, 1 in Compacter; r = min(in, out)/n
gives the full PHM layer). s starts at zero, so a fresh adapter is a no-op; ΔW merges. The paper's
bottleneck adapter around the PHM layers is left out: here the PHM layer is the delta itself.

The shared rule is registered on the adapter's first delta only (the others reference it), so it
is saved, loaded, counted and optimised once.

Hosts: Linear and GPT-2's Conv1D.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from ...core.config import AdapterConfig, register_method
from ...core.delta import Delta
from ...core.hosts import LINEAR_TYPES, host_shape


@register_method
class Compacter(AdapterConfig):
    """Compacter config: the hypercomplex dimension n and the rank r of each B_i."""

    method: ClassVar[str] = "compacter"
    phm_dim: int = Field(4, gt=0, description="n: the number of Kronecker terms; must divide in and out")
    phm_rank: int = Field(1, gt=0, description="r: rank of each B_i = s_i t_i")

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def build_all(self, hosts: dict[str, nn.Module]) -> Iterator["CompacterDelta"]:
        """The first delta creates the shared rule A; the others reference it."""
        owner = None
        for host in hosts.values():
            delta = CompacterDelta(host, self, owner)
            if owner is None:
                owner = delta
            yield delta

    def build(self, host: nn.Module) -> "CompacterDelta":
        return CompacterDelta(host, self, None)


class CompacterDelta(Delta):
    """One PHM delta on one host: increment(x) = Σ_i (A_i ⊗ s_i t_i) x, A from the owner delta."""

    def __init__(self, host: nn.Module, config: Compacter, owner: CompacterDelta | None):
        super().__init__()
        shape, n, r = host_shape(host), config.phm_dim, config.phm_rank
        if shape.out_features % n or shape.in_features % n:
            raise ValueError(f"phm_dim {n} does not divide the weight shape (out, in) = "
                             f"({shape.out_features}, {shape.in_features})")
        # Adapter weights stay float32 on a half-precision base, as LoRA's do.
        factory = {"dtype": torch.float32, "device": host.weight.device}
        if owner is None:  # unit-variance rule: with n = 1 this is LoRA with scale A_1
            self.phm_rule = nn.Parameter(torch.randn(n, n, n, **factory))  # [n, n, n]: A_i
        # A tuple, not an attribute torch would register: only the owner saves and optimises the rule.
        self._rule_owner = (owner or self,)
        self.phm_s = nn.Parameter(torch.zeros(n, shape.out_features // n, r, **factory))  # [n, out/n, r]: s_i
        self.phm_t = nn.Parameter(torch.empty(n, r, shape.in_features // n, **factory))  # [n, r, in/n]: t_i
        nn.init.uniform_(self.phm_t, -1 / math.sqrt(shape.in_features // n), 1 / math.sqrt(shape.in_features // n))

    @property
    def rule(self) -> torch.Tensor:
        return self._rule_owner[0].phm_rule

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        n = self.phm_s.shape[0]
        blocks = x.to(self.phm_t.dtype).reshape(*x.shape[:-1], n, -1)  # [..., in] -> [..., n, in/n]: X
        # Row-major (A ⊗ B) x = vec(A X Bᵀ); with B_i = s_i t_i, contract t first (smallest), then A_i, then s_i.
        down = torch.einsum("...jl,irl->...ijr", blocks, self.phm_t)  # [..., n(i), n(j), r]: X t_iᵀ
        mixed = torch.einsum("ipj,...ijr->...ipr", self.rule, down)  # [..., n(i), n(p), r]: A_i X t_iᵀ
        y = torch.einsum("...ipr,ikr->...pk", mixed, self.phm_s)  # [..., n, out/n]: Σ_i A_i X t_iᵀ s_iᵀ
        return y.reshape(*x.shape[:-1], -1)  # [..., out]

    def delta_weight(self) -> torch.Tensor:
        b = self.phm_s.float() @ self.phm_t.float()  # [n, out/n, in/n]: B_i = s_i t_i
        return sum(torch.kron(a, b_i) for a, b_i in zip(self.rule.float(), b))  # [out, in]
