"""BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models
(Ben Zaken, Goldberg & Ravfogel, 2022, arXiv:2106.10199).

    h = W0 x + (b0 + Δb)

Only the bias terms of the targets train (give the task head as `modules_to_save`); each Δb is a
dense block, so a saved adapter is the biases alone. Merges into b exactly. Every targeted module
must have a bias: a target without one is a named error, never silently skipped.
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from ...core.config import register_method
from .mask import Mask
from .sparse import SelectiveConfig, whole_masks


@register_method
class BitFit(SelectiveConfig):
    """BitFit config: which modules' biases train (e.g. `["type:Linear", "type:LayerNorm"]`, exclude the head)."""

    method: ClassVar[str] = "bitfit"
    param_names: ClassVar[tuple[str, ...]] = ("bias",)

    def masks(self, hosts: dict[str, nn.Module]) -> dict[str, Mask]:
        return whole_masks(hosts, self.param_names)
