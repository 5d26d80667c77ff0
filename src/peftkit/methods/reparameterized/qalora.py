"""QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models (Xu et al., 2023, arXiv:2309.14717).

    h = W_q x + s · B A pool_L(x),   pool_L(x)_g = mean(x[gL : (g+1)L]),   A ∈ R^{r×(in/L)}, B ∈ R^{out×r},  s = α/r

W_q is a grouped INT4 base (`peftkit.efficient.int4.GroupINT4Linear`) with groups of L input columns. Pooling the
input of A over the same groups makes ΔW = s·BA/L repeated over each group's L columns: constant within every
(row, group), so merging adds it to the group's zero point (z' = z − ΔW/scale) and the merged model is still exactly
a grouped-INT4 model with the same codes — no dequantize / re-quantize, and the merged forward equals the unmerged one.

Hosts: `GroupINT4Linear` only (L is the host's group size). Any other Linear is refused with the reason: QA-LoRA's
merge needs the group zero points; quantize the model first (`peftkit.efficient.int4.quantize_int4`).
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...core.config import AdapterConfig, register_method
from ...core.delta import Delta
from ...efficient.int4 import GroupINT4Linear


@register_method
class QALoRA(AdapterConfig):
    """QA-LoRA config: rank, scaling and dropout of a LoRA whose A reads the group-pooled input."""

    method: ClassVar[str] = "qalora"
    not_trained_by_run: ClassVar[str | None] = (
        "it trains on a grouped-INT4 base, which model.quantize does not build: quantize with "
        "peftkit.efficient.int4.quantize_int4(model, group_size=...) and train in Python")
    r: int = Field(8, gt=0, description="rank of ΔW")
    alpha: float = Field(8.0, gt=0, description="scaling numerator: s = alpha/r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the pooled input of A")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Linear,)  # any Linear is matched, so a float one is refused with the reason (below), not skipped

    def build(self, host: nn.Module) -> "QALoRADelta":
        if not isinstance(host, GroupINT4Linear):
            raise ValueError(f"QA-LoRA needs a grouped-INT4 base to merge into (its update lands in the group zero "
                             f"points), got a {type(host).__name__}: quantize the model first with "
                             f"peftkit.efficient.int4.quantize_int4(model, group_size=...)")
        return QALoRADelta(host, self)


class QALoRADelta(Delta):
    """One QA-LoRA pair on a GroupINT4Linear: increment(x) = s · B A pool_L(x)."""

    def __init__(self, host: GroupINT4Linear, config: QALoRA):
        super().__init__()
        groups, r = host.groups, config.r
        if r > min(host.out_features, groups):
            raise ValueError(f"QA-LoRA rank {r} exceeds min(out, in/L) = {min(host.out_features, groups)} of this "
                             f"{host.in_features}->{host.out_features} layer with groups of {host.group_size}")
        self.group_size, self.scaling = host.group_size, config.scaling
        factory = {"dtype": torch.float32, "device": host.weight_scales.device}
        self.lora_A = nn.Parameter(torch.empty(r, groups, **factory))  # [r, in/L]
        self.lora_B = nn.Parameter(torch.zeros(host.out_features, r, **factory))  # [out, r]: a fresh adapter is a no-op
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of each group of L input features: [..., in] -> [..., in/L]."""
        return x.to(self.lora_A.dtype).unflatten(-1, (-1, self.group_size)).mean(-1)

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(self.pool(x)), self.lora_A), self.lora_B) * self.scaling

    def group_update(self) -> torch.Tensor:
        """ΔW per (row, group), [out, in/L]: s·BA/L, the value every column of the group gets."""
        return (self.lora_B.float() @ self.lora_A.float()) * (self.scaling / self.group_size)

    def delta_weight(self) -> torch.Tensor:
        return self.group_update().repeat_interleave(self.group_size, dim=1)  # [out, in]

    def merge_into(self, host: GroupINT4Linear) -> None:
        host.add_group_constants(self.group_update())

    def unmerge_from(self, host: GroupINT4Linear) -> None:
        host.add_group_constants(-self.group_update())
