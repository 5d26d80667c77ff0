"""UniPELT (Mao et al., 2022, arXiv:2110.07577): LoRA, prefix tuning and a bottleneck adapter in every layer, each
behind a learned gate, so training decides how much each method contributes.

    Q, V ← Q, V + G_L · s·B A x          G_L = σ(W_L x + b_L)      (LoRA on the query and value projections)
    P_k, P_v ← G_P · P_k, G_P · P_v      G_P = σ(W_P ē + b_P)      (prefix keys and values, per layer)
    h ← h + G_A · W_up f(W_down h)       G_A = σ(W_A h + b_A)      (a serial adapter after the feed-forward)

The gates are those of `Compose(..., gates="learned")` (see methods/hybrid/compose.py: ē, the prefix gate's input,
is the row's mean input embedding). Every gate starts at 1/2; LoRA's B and the adapter's W_up start at zero, so a
fresh UniPELT changes the model only through its half-strength prefix.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from ...core.config import TargetSpec, register_method
from ..additive.bottleneck import PRESETS, Bottleneck
from ..additive.prefix import PrefixTuning
from ..reparameterized.lora import LoRA
from .compose import HybridConfig, Placed

QUERY_VALUE = r".*\.(query|value|q_proj|v_proj)"  # BERT-style and Llama-style attention projections


@register_method
class UniPELT(HybridConfig):
    """UniPELT config: LoRA rank and targets, prefix length, adapter width and targets; gates learned by default."""

    method: ClassVar[str] = "unipelt"
    gates: Literal["none", "learned"] = Field("learned", description="'learned' (UniPELT); 'none': the methods ungated")
    r: int = Field(8, gt=0, description="LoRA's rank")
    alpha: float = Field(16.0, gt=0, description="LoRA's scaling numerator (s = alpha / r)")
    lora_targets: TargetSpec = Field(QUERY_VALUE, description="LoRA's modules (the query and value projections)")
    num_virtual_tokens: int = Field(10, gt=0, description="prefix length")
    bottleneck: int = Field(32, gt=0, description="the adapter's width")
    adapter_targets: TargetSpec = Field(PRESETS["pfeiffer"]["targets"], description="the adapter's modules (FFN outputs)")

    def placed_parts(self, model: nn.Module) -> list[Placed]:
        gated = self.gates == "learned"
        return [Placed(LoRA(r=self.r, alpha=self.alpha, targets=self.lora_targets), gated),
                Placed(PrefixTuning(num_virtual_tokens=self.num_virtual_tokens), gated),
                Placed(Bottleneck(bottleneck=self.bottleneck, placement="serial", targets=self.adapter_targets), gated)]
