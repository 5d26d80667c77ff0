"""PaFi: train the pretrained weights of smallest magnitude (Liao, Meng & Monz, 2023,
"Parameter-Efficient Fine-Tuning without Introducing New Latency", arXiv:2305.16742).

    M = the round(f·N) entries of smallest |W0| over all targeted weights;   W' = W0 + M ⊙ ΔW

Task-agnostic: the mask comes from the base alone, at attach (so a reload picks the same entries,
and the file carries them anyway). Candidates are the targets' weights; ties in |W0| are broken
arbitrarily but the count is exact. Stored as indices + values; merges exactly.
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from ...core.config import register_method
from .mask import Mask
from .selection import Fraction, top_fraction
from .sparse import SelectiveConfig


@register_method
class PaFi(SelectiveConfig):
    """PaFi config: the share of the targets' weights to train, chosen by smallest magnitude."""

    method: ClassVar[str] = "pafi"
    param_names: ClassVar[tuple[str, ...]] = ("weight",)
    fraction: Fraction = 0.005

    def masks(self, hosts: dict[str, nn.Module]) -> dict[str, Mask]:
        return top_fraction({f"{name}.weight": host.weight.detach().abs() for name, host in hosts.items()},
                            self.fraction, largest=False)
