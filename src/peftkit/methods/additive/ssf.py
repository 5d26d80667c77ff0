"""SSF: Scaling & Shifting Your Features (Lian et al., 2022, arXiv:2210.08823).

    h = γ ⊙ out + β,   γ, β ∈ R^{channels} (out = the host's output),   γ = 1, β = 0 at start

Only γ and β train; at their start values the model is unchanged. They fold into the host
that produced `out` (W ← diag(γ) W, b ← γ ⊙ b + β; a LayerNorm's weight and bias likewise), so
merging costs nothing at inference. Hosts: Linear (and GPT-2's Conv1D), Conv2d (per output
channel), LayerNorm (per normalised element). No HF PEFT equivalent.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ...core.config import AdapterConfig, register_method
from ...core.delta import Delta
from ...core.hosts import LINEAR_TYPES, host_shape
from .channel_scale import fold_, fold_refusal, unfold_


@register_method
class SSF(AdapterConfig):
    """SSF config: where to scale and shift (no other hyper-parameters)."""

    method: ClassVar[str] = "ssf"

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES + (nn.Conv2d, nn.LayerNorm)

    def build(self, host: nn.Module) -> "SSFDelta":
        return SSFDelta(host)


def _channel_shape(host: nn.Module) -> tuple[int, ...]:
    """Shape of γ, β so they broadcast over the host's output channels."""
    if isinstance(host, nn.LayerNorm):
        if host.weight is None:
            raise ValueError("SSF on a LayerNorm needs elementwise_affine=True (its weight takes the merged γ)")
        return tuple(host.normalized_shape)
    if isinstance(host, nn.Conv2d):  # any groups: diag(γ) W scales whole output filters
        return (host.out_channels, 1, 1)  # broadcasts over [C, H, W]
    return (host_shape(host).out_features,)


class SSFDelta(Delta):
    """γ and β on one host's output: transform(x, out) = γ ⊙ out + β."""

    additive = False
    reads_input = False

    def __init__(self, host: nn.Module):
        super().__init__()
        shape, factory = _channel_shape(host), {"dtype": torch.float32, "device": host.weight.device}
        self.scale = nn.Parameter(torch.ones(shape, **factory))
        self.shift = nn.Parameter(torch.zeros(shape, **factory))

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, out.to(self.scale.dtype), self.scale).to(out.dtype)

    def merge_refusal(self, host: nn.Module) -> str | None:
        return fold_refusal(host, self.scale.detach().flatten(), self.shift.detach().flatten())

    def merge_into(self, host: nn.Module) -> None:
        fold_(host, self.scale.detach().flatten(), "out", self.shift.detach().flatten())

    def unmerge_from(self, host: nn.Module) -> None:
        unfold_(host, self.scale.detach().flatten(), "out", self.shift.detach().flatten())
