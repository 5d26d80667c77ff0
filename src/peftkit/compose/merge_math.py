"""The tensor formulas of adapter merging, free of models: task vectors τ_i (one adapter's change of one tensor),
weights w_i, and LoRA factors (A_i, B_i).

Dense task-vector methods (Task Arithmetic, Ilharco et al. 2023; TIES, Yadav et al. 2023, arXiv:2306.01708;
DARE, Yu et al. 2024, arXiv:2311.03099):

    linear           τ = Σ_i w_i τ_i
    magnitude_prune  τ = Σ_i w_i trim(τ_i)
    ties             τ = disjoint_mean_γ(w_i trim(τ_i)),  γ = sgn(Σ_i w_i trim(τ_i))   ("total"; "frequency": Σ_i sgn(·))
    dare_linear      τ = Σ_i w_i drop(τ_i)
    dare_ties        τ = disjoint_mean_γ(w_i drop(τ_i))

    trim(t):  t on its round(d·n) largest-magnitude entries, 0 elsewhere (n: t's non-zero entries, d: density)
    drop(t):  m ⊙ t / d,  m_j ~ Bernoulli(d) (DARE drops with p = 1 − d and rescales by 1/(1 − p): E[drop(t)] = t)
    disjoint_mean_γ(u)_j = Σ_{i: sgn u_ij = γ_j} u_ij / |{i: sgn u_ij = γ_j}|   (0 where no u_ij agrees; γ_j = 0 → +1)

LoRA factors, ΔW_i = s_i B_i A_i:

    linear_factors  A = Σ_i a_i A_i,  B = Σ_i b_i B_i          (Hugging Face PEFT's "linear": a_i = sgn(c_i)·√|c_i|,
                    b_i = √|c_i|, c_i = w_i s_i; so BA = Σ_i Σ_j b_i a_j B_i A_j, cross terms included: NOT Σ_i w_i ΔW_i)
    concatenated    A = [A_1; A_2; ...],  B = [c_1 B_1 | c_2 B_2 | ...]   so BA = Σ_i w_i ΔW_i exactly (rank Σ_i r_i)
    truncated_svd   ΔW ≈ U_r S_r V_rᵀ = B A,  B = U_r √S_r,  A = √S_r V_rᵀ   (best rank-r approximation, Eckart–Young)
    factored_svd    the same for ΔW = B A given as factors of rank R: B = Q_B R_B, Aᵀ = Q_A R_A (QR), the SVD of the
                    R×R core R_B R_Aᵀ = U S Vᵀ gives ΔW's as Q_B U, S, Q_A V: O((out + in)·R²), ΔW never formed
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

DenseMethod = Literal["linear", "magnitude_prune", "ties", "dare_linear", "dare_ties"]
SignMethod = Literal["total", "frequency"]


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_i w_i t_i."""
    return sum(w * t for w, t in zip(weights, tensors, strict=True))


def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` on its round(density·n) largest-magnitude entries (n: its non-zero entries, at least one kept), 0
    elsewhere: TIES' "trim" and magnitude pruning. Counting the non-zero entries makes the density mean the same for a
    sparse task vector (a selective adapter's) as for a dense one (a LoRA's ΔW)."""
    flat = tensor.flatten()
    nonzero = int(torch.count_nonzero(flat))
    if nonzero == 0:
        return tensor.clone()
    keep = max(1, round(density * nonzero))
    kept = torch.zeros_like(flat)
    top = flat.abs().topk(keep).indices
    kept[top] = flat[top]
    return kept.view_as(tensor)


def drop(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability `density` (drawn on the CPU from `generator`, so a seed gives the same
    masks on any device), kept entries rescaled by 1/density; E[drop(t)] = t."""
    keep = torch.rand(tensor.shape, generator=generator) < density
    return torch.where(keep.to(tensor.device), tensor / density, torch.zeros_like(tensor))


def elect_sign(weighted: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """γ over stacked weighted task vectors [K, ...]: the sign of their summed mass ("total") or of their summed signs
    ("frequency"); +1 where it is 0."""
    mass = weighted.sum(0) if method == "total" else weighted.sign().sum(0)
    return torch.where(mass >= 0, 1.0, -1.0).to(weighted.dtype)


def disjoint_mean(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """The mean, entry by entry, of the stacked task vectors [K, ...] whose sign is the elected one (zeros never
    agree); 0 where none does."""
    agree = weighted.sign() == sign
    count = agree.sum(0).clamp(min=1)
    return (weighted * agree).sum(0) / count


def combine(method: DenseMethod, tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float = 1.0,
            generator: torch.Generator | None = None, sign_method: SignMethod = "total") -> torch.Tensor:
    """One merged task vector from K task vectors of one tensor by `method` (the module docstring's formulas)."""
    if method == "linear":
        return weighted_sum(tensors, weights)
    if method in ("magnitude_prune", "ties"):
        tensors = [trim(t, density) for t in tensors]
    else:
        if generator is None:
            raise ValueError(f"{method} draws random masks: pass a seeded generator")
        tensors = [drop(t, density, generator) for t in tensors]
    if method in ("magnitude_prune", "dare_linear"):
        return weighted_sum(tensors, weights)
    weighted = torch.stack([w * t for w, t in zip(weights, tensors, strict=True)])
    return disjoint_mean(weighted, elect_sign(weighted, sign_method))


def peft_factor_weights(coefficients: Sequence[float]) -> tuple[list[float], list[float]]:
    """PEFT's split of c_i = w_i s_i over the two factors: (a_i, b_i) = (sgn(c_i)·√|c_i|, √|c_i|), so a_i b_i = c_i."""
    roots = [math.sqrt(abs(c)) for c in coefficients]
    return [math.copysign(root, c) for root, c in zip(roots, coefficients)], roots


def linear_factors(a_factors: Sequence[torch.Tensor], b_factors: Sequence[torch.Tensor], a_weights: Sequence[float],
                   b_weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_i a_i A_i, Σ_i b_i B_i): factors of one rank mixed entry by entry (PEFT's "linear" with
    `peft_factor_weights`; LoRAHub's composition with a_i = w_i, b_i = w_i s_i)."""
    return weighted_sum(a_factors, a_weights), weighted_sum(b_factors, b_weights)


def concatenated(a_factors: Sequence[torch.Tensor], b_factors: Sequence[torch.Tensor],
                 coefficients: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """([A_1; A_2; ...], [c_1 B_1 | c_2 B_2 | ...]): B A = Σ_i c_i B_i A_i exactly. A: [r_i, in, *k], B: [out, r_i, *1]."""
    return torch.cat(list(a_factors)), torch.cat([c * b for c, b in zip(coefficients, b_factors, strict=True)], dim=1)


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in, *k], B [out, r, *1]) with B A the best rank-r approximation of ΔW [out, in, *k] (conv kernels
    flattened into the input), the singular values split as √S on each side."""
    u, s, vh = torch.linalg.svd(delta.flatten(1).float(), full_matrices=False)
    return _split(u, s, vh, rank, delta.shape)


def factored_svd(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`truncated_svd` of ΔW = B A from its factors (A [R, in, *k], B [out, R, *1]) without forming ΔW."""
    q_b, r_b = torch.linalg.qr(b.flatten(1).float())
    q_a, r_a = torch.linalg.qr(a.flatten(1).float().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return _split(q_b @ u, s, vh @ q_a.T, rank, (b.shape[0], *a.shape[1:]))


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int,
           shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`rank` triplets as factors (A, B) of a ΔW of `shape`, √S on each side (zero-padded past ΔW's rank)."""
    root = torch.zeros(rank, dtype=s.dtype, device=s.device)
    root[:min(rank, s.numel())] = s[:rank].sqrt()
    u, vh = _columns(u, rank), _columns(vh.T, rank).T
    a = (root[:, None] * vh).reshape(rank, *shape[1:])
    b = (u * root[None, :]).reshape(shape[0], rank, *(1,) * (len(shape) - 2))
    return a, b


def _columns(matrix: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` columns of `matrix`, zero columns added where it has fewer."""
    return torch.nn.functional.pad(matrix[:, :count], (0, max(0, count - matrix.shape[1])))
