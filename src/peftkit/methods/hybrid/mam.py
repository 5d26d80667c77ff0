"""The Mix-And-Match adapter (He et al., 2022, arXiv:2110.04366, "Towards a unified view of parameter-efficient
transfer learning"): prefix tuning on the attention and a scaled parallel adapter beside the feed-forward network.

    attention_l(x) = softmax(q [P_k^l; K]ᵀ / √d) [P_v^l; V]      (a long prefix: 30 virtual tokens)
    h_FFN ← h_FFN + s · W_up ReLU(W_down x_FFN),  s = 4          (the scaled parallel adapter)

He et al. found that a modification on the FFN uses extra parameters best at a large width, the attention at a small
budget, and prefix tuning is the strongest attention modification; MAM spends most parameters on the FFN adapter.
The parallel adapter sits on the FFN's output projection and reads its input (`Bottleneck.preset("parallel")`).
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import nn

from ...core.config import TargetSpec, register_method
from ..additive.bottleneck import PRESETS, Bottleneck
from ..additive.prefix import PrefixTuning
from .compose import HybridConfig, Placed


@register_method
class MAM(HybridConfig):
    """MAM adapter config: prefix length, the parallel adapter's width, scale and targets; ungated as in the paper
    (gates="learned" gates both parts as in `Compose`)."""

    method: ClassVar[str] = "mam"
    num_virtual_tokens: int = Field(30, gt=0, description="prefix length (He et al.: 30)")
    bottleneck: int = Field(128, gt=0, description="the parallel adapter's width (He et al.: 512 on BART-large)")
    scale: float = Field(4.0, gt=0, description="s on the adapter's output (He et al.: 4)")
    adapter_targets: TargetSpec = Field(PRESETS["parallel"]["targets"], description="the FFN output projections")

    def placed_parts(self, model: nn.Module) -> list[Placed]:
        gated = self.gates == "learned"
        return [Placed(PrefixTuning(num_virtual_tokens=self.num_virtual_tokens), gated),
                Placed(Bottleneck(bottleneck=self.bottleneck, placement="parallel", scale=self.scale,
                                  targets=self.adapter_targets), gated)]
