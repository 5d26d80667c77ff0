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
from .nf_codebook import pack_codes, unpack_codes
from .packed_linear import PackedLinear

LEVELS = 15  # 4-bit codes 0..15


class GroupINT4Linear(PackedLinear):
    """A Linear stored as grouped asymmetric INT4: `weight` holds the packed codes, `weight_scales` and
    `weight_zeros` ([out, in/L], float32) each (row, group)'s s and z; the forward dequantizes
    (`efficient.packed_linear`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32,
                 device: torch.device | str | None = None):
        if group_size <= 0 or in_features % group_size:
            raise ValueError(f"group_size {group_size} must be positive and divide in_features {in_features}")
        super().__init__(in_features, out_features, bias, device)
        self.group_size = group_size
        self._quantize(torch.zeros(out_features, in_features, device=device))

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

    def _pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        grouped = weight.view(self.out_features, self.groups, self.group_size)
        low, high = grouped.amin(-1), grouped.amax(-1)
        scales = (high - low) / LEVELS
        scales = torch.where(scales > 0, scales, 1.0)  # a constant group: any scale, z = −value puts it at code 0
        zeros = -low / scales
        codes = (grouped / scales[..., None] + zeros[..., None]).round().clamp(0, LEVELS)
        return pack_codes(codes.flatten(), 4), {"weight_scales": scales, "weight_zeros": zeros}

    @torch.no_grad()
    def add_group_constants(self, change: torch.Tensor) -> None:
        """W[o, j] += change[o, ⌊j/L⌋], exactly in the stored form: z −= change / s (codes untouched). The zero
        points are replaced, not written into, so a state kept before (a merge's) still holds the old ones."""
        if tuple(change.shape) != tuple(self.weight_zeros.shape):
            raise ValueError(f"a group change must be [out, in/L] = {tuple(self.weight_zeros.shape)}, "
                             f"got {tuple(change.shape)}")
        self.weight_zeros = self.weight_zeros - change.to(self.weight_zeros.dtype) / self.weight_scales

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
