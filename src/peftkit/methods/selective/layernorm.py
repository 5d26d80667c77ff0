"""LayerNorm tuning: train only the normalisation layers' gain and bias
(as studied in Zhao et al., 2023, "Tuning LayerNorm in Attention", arXiv:2312.11420; a BitFit-like rule).

    h = (γ0 + Δγ) ⊙ (x − μ)/σ + (β0 + Δβ)        RMSNorm (Llama family): h = (w0 + Δw) ⊙ x / rms(x)

Each Δγ, Δβ is a dense block; merges into the norm exactly. Targets default to every LayerNorm; RMSNorms
(torch's and transformers' per-model classes) are named, e.g. ["input_layernorm", "post_attention_layernorm", "norm"].
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from ...core.config import TargetSpec, register_method
from ...core.hosts import RMSNormLike
from .mask import Mask
from .sparse import SelectiveConfig, whole_masks


@register_method
class LayerNormTuning(SelectiveConfig):
    """LayerNorm-tuning config: which LayerNorms train (default: all)."""

    method: ClassVar[str] = "layernorm"
    targets: TargetSpec = ["type:LayerNorm"]

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.LayerNorm, RMSNormLike)

    def masks(self, hosts: dict[str, nn.Module]) -> dict[str, Mask]:
        return whole_masks(hosts, self.param_names)
