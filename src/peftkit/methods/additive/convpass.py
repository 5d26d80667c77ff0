"""Convpass (Jie & Deng, 2022, arXiv:2207.07039): convolutional bypasses beside a frozen vision transformer's blocks.

    h ← h + s · W_up φ(conv3×3(φ(W_down x)))      x: the block's input tokens, h: its output, φ(z) = z · σ(1.702 z)

W_down (d → c per token, c = `dim`; Xavier-uniform, bias 0) and W_up (c → d; zero, so a fresh adapter is an exact
no-op) are 1×1 convolutions; the 3×3 convolution (c → c, padding 1; starting as the identity on its centre tap,
bias 0) runs over the patch tokens laid back on their square h × w grid. The tokens before the grid (the CLS token:
`leading_tokens`) each pass the same convolution alone, as a 1×1 image, so only its centre tap reaches them, as in
the paper's code. The paper's dropout on the bypass is left out (rows must equal running alone).

Hosts: the attention and MLP blocks (`attention`, `mlp` in Dinov2 and ViT), read at the block's input and added to
its output. On DINOv2 the layer's frozen layer scale multiplies the block's output, the bypass included (a fixed
per-channel factor W_up absorbs). Non-linear, so it does not merge.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...core.config import AdapterConfig, TargetSpec, register_method
from ...core.delta import Delta
from ...core.targets import TargetError, io_widths, patch_projection


@register_method
class Convpass(AdapterConfig):
    """Convpass config: which blocks get a bypass, its channels, its output scale, the tokens before the grid."""

    method: ClassVar[str] = "convpass"
    targets: TargetSpec = Field(r".*\.(attention|mlp)", description="the attention and MLP blocks the bypasses go beside")
    dim: int = Field(8, gt=0, description="channels c of the bypass")
    scale: float = Field(0.1, gt=0, description="s, the factor on the bypass's output")
    leading_tokens: int = Field(1, ge=0, description="tokens before the patch grid (CLS), each convolved alone")

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Module,)  # a block of linear layers: `io_widths` refuses any other module

    def choose_hosts(self, model: nn.Module) -> list[str]:
        if patch_projection(model) is None:
            raise TargetError(f"Convpass lays tokens on a vision transformer's patch grid, but {type(model).__name__} "
                              "has no patch embedding (a Conv2d whose stride equals its kernel)")
        return super().choose_hosts(model)

    def build(self, host: nn.Module) -> "ConvpassDelta":
        return ConvpassDelta(host, self)


def quick_gelu(z: torch.Tensor) -> torch.Tensor:
    return z * torch.sigmoid(1.702 * z)


class ConvpassDelta(Delta):
    """One bypass beside one block: increment(x) = s · up(φ(conv(φ(down(x))))), the conv on the patch grid."""

    def __init__(self, host: nn.Module, config: Convpass):
        super().__init__()
        in_features, out_features = io_widths(host)
        self.scale, self.leading = config.scale, config.leading_tokens
        factory = {"dtype": torch.float32, "device": next(host.parameters()).device}
        self.down = nn.Linear(in_features, config.dim, **factory)
        self.conv = nn.Conv2d(config.dim, config.dim, 3, padding=1, **factory)
        self.up = nn.Linear(config.dim, out_features, **factory)
        nn.init.xavier_uniform_(self.down.weight)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, 1, 1] = torch.eye(config.dim)
        for zero in (self.down.bias, self.conv.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(zero)

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        z = quick_gelu(self.down(x.to(self.down.weight.dtype)))  # [B, N, c]
        leading, patches = z[:, :self.leading], z[:, self.leading:]
        batch, count, channels = patches.shape
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"Convpass lays the patch tokens on a square grid, but {count} tokens follow the "
                             f"{self.leading} leading one(s); use square images or set leading_tokens")
        grid = patches.transpose(1, 2).reshape(batch, channels, side, side)
        patches = self.conv(grid).flatten(2).transpose(1, 2)
        leading = F.linear(leading, self.conv.weight[:, :, 1, 1], self.conv.bias)  # a 1×1 image: the centre tap
        return self.up(quick_gelu(torch.cat([leading, patches], 1))) * self.scale
