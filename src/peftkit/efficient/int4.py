"""Grouped asymmetric INT4: the base QA-LoRA merges into (Xu et al., 2023, arXiv:2309.14717).

    W[o, j] ≈ s[o, g] · (q[o, j] − z[o, g]),   g = ⌊j / L⌋,   q ∈ {0, …, 15}

Each output row is cut into groups of L input columns; min-max quantization gives every (row, group) its own
scale s = (max − min)/15 and zero point z = −min/s. The zero point stays float (not rounded to an integer as in
GPTQ kernels), so a change that is constant over a group's columns is absorbed into it exactly — QA-LoRA's merge:
W + c ⇔ z' = z − c/s, the codes q unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.config import TargetSpec
from ..core.hosts import QuantizedHost
from ..core.slot import deltas_of
from ..core.targets import match_targets
from .frozen_matmul import frozen_linear
from .nf_codebook import pack_codes, unpack_codes

LEVELS = 15  # 4-bit codes 0..15


class GroupINT4Linear(nn.Linear):
    """A Linear stored as grouped asymmetric INT4: `weight` holds the packed codes (uint8, frozen), `weight_scales`
    and `weight_zeros` ([out, in/L], float32) each (row, group)'s s and z; the forward dequantizes. A QuantizedHost."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32,
                 device: torch.device | str | None = None):
        if group_size <= 0 or in_features % group_size:
            raise ValueError(f"group_size {group_size} must be positive and divide in_features {in_features}")
        super().__init__(in_features, out_features, bias, device="meta")  # the float weight is never materialised
        self.group_size = group_size
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8, device=device), requires_grad=False)
        self.register_buffer("weight_scales", torch.empty(0, device=device))
        self.register_buffer("weight_zeros", torch.empty(0, device=device))
        self.store_weight(torch.zeros(out_features, in_features, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "GroupINT4Linear":
        """`linear` quantized to grouped INT4 (its bias kept in full precision)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                     device=linear.weight.device)
        module.store_weight(linear.weight)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size

    def codes(self) -> torch.Tensor:
        """q as int64, [out, in]."""
        count = self.out_features * self.in_features
        return unpack_codes(self.weight.data, 4, count).view(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        grouped = self.codes().view(self.out_features, self.groups, self.group_size).float()
        return (self.weight_scales[..., None] * (grouped - self.weight_zeros[..., None])).flatten(1)

    @torch.no_grad()
    def store_weight(self, weight: torch.Tensor) -> None:
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"GroupINT4Linear stores a {expected} weight, got {tuple(weight.shape)}")
        grouped = weight.detach().float().view(self.out_features, self.groups, self.group_size)
        low, high = grouped.amin(-1), grouped.amax(-1)
        scales = (high - low) / LEVELS
        scales = torch.where(scales > 0, scales, 1.0)  # a constant group: any scale, z = −value puts it at code 0
        zeros = -low / scales
        codes = (grouped / scales[..., None] + zeros[..., None]).round().clamp(0, LEVELS)
        self.weight.data, self.weight_scales, self.weight_zeros = pack_codes(codes.flatten(), 4), scales, zeros

    @torch.no_grad()
    def add_group_constants(self, change: torch.Tensor) -> None:
        """W[o, j] += change[o, ⌊j/L⌋], exactly in the stored form: z −= change / s (codes untouched)."""
        if tuple(change.shape) != tuple(self.weight_zeros.shape):
            raise ValueError(f"a group change must be [out, in/L] = {tuple(self.weight_zeros.shape)}, "
                             f"got {tuple(change.shape)}")
        self.weight_zeros -= change.to(self.weight_zeros.dtype) / self.weight_scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the dequantized weight is not kept for the backward
        return frozen_linear(x, lambda rows: self.dequantized_weight()[rows], self.out_features, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def quantize_int4(model: nn.Module, targets: TargetSpec = "all-linear", group_size: int = 32,
                  exclude: TargetSpec | None = None) -> nn.Module:
    """Replace the model's Linear layers named by `targets` (peftkit's target syntax) with `GroupINT4Linear`, in
    place; returns the model. Run it before attaching adapters: deltas sit on the module they were attached to."""
    chosen = {name: model.get_submodule(name) for name in match_targets(model, targets, exclude, (nn.Linear,))}
    problems = {"already quantized": [n for n, m in chosen.items() if isinstance(m, QuantizedHost)],
                "carrying adapters (attach after quantizing)": [n for n, m in chosen.items() if deltas_of(m)],
                f"with an input width group_size {group_size} does not divide":
                    [n for n, m in chosen.items() if m.in_features % group_size]}
    for problem, names in problems.items():
        if names:
            raise ValueError(f"cannot quantize modules {problem}: {names[:5]}")
    for name, linear in chosen.items():
        model.set_submodule(name, GroupINT4Linear.from_linear(linear, group_size))
    return model
