"""CLIP-Adapter (Gao et al., 2021, "CLIP-Adapter: Better Vision-Language Models with Feature Adapters", IJCV 2024,
arXiv:2110.04544): residual bottleneck adapters on CLIP's image feature and, optionally, on the class text features.

    A(f) = ReLU(f W_1) W_2,   f* = α A_v(f) + (1 − α) f,   W* = α A_t(W) + (1 − α) W
    logits_k(x) = s · cos(f*(x), w*_k)

W_1 ∈ R^{D × D/r}, W_2 ∈ R^{D/r × D} without biases (reduction r = 4 and α = 0.2 in the paper's code); f is the
projected image feature, W the class text features (the classifier weight). Only the adapters train; α = 0 gives
zero-shot CLIP. The adapters start as `nn.Linear`'s default init, as in the released code, so a fresh adapter already
moves the logits by α. `output_relu` adds the ReLU the released code also puts after W_2 (the paper's formula has
none). The delta rewrites the class head's logits (`classifier.py`), so routed rows each get their own adapter.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from ...core.config import register_method
from .classifier import ClassHead, HeadDelta, HeadMethod


@register_method
class CLIPAdapter(HeadMethod):
    """CLIP-Adapter config: residual ratio α, the bottleneck's reduction, and which features get an adapter."""

    method: ClassVar[str] = "clip_adapter"
    alpha: float = Field(0.2, ge=0, le=1, description="α, the residual ratio: f* = α A(f) + (1 − α) f")
    reduction: int = Field(4, gt=0, description="r: the adapter's hidden width is the feature width // r")
    image: bool = Field(True, description="an adapter A_v on the image feature")
    text: bool = Field(False, description="an adapter A_t on the class text features")
    output_relu: bool = Field(False, description="a ReLU after W_2 too, as in the released code")

    @model_validator(mode="after")
    def _some_adapter(self) -> "CLIPAdapter":
        if not (self.image or self.text):
            raise ValueError("image and text are both false: CLIP-Adapter needs an adapter on one of the features")
        return self

    def build(self, host: nn.Module) -> "CLIPAdapterDelta":
        return CLIPAdapterDelta(host, self)


class CLIPAdapterDelta(HeadDelta):
    """The image adapter `image_adapter` and / or the text adapter `text_adapter` of one classifier head."""

    additive = False

    def __init__(self, head: ClassHead, config: CLIPAdapter):
        super().__init__(head)
        hidden = head.feature_dim // config.reduction
        if hidden < 1:
            raise ValueError(f"reduction {config.reduction} leaves no hidden unit of the {head.feature_dim}-wide "
                             "features: use a smaller reduction")
        self.alpha = config.alpha
        device = head.class_features.device
        self.image_adapter = _adapter(head.feature_dim, hidden, config.output_relu, device) if config.image else None
        self.text_adapter = _adapter(head.feature_dim, hidden, config.output_relu, device) if config.text else None

    def _blend(self, adapter: nn.Module | None, features: torch.Tensor) -> torch.Tensor:
        if adapter is None:
            return features
        features = features.float()
        return self.alpha * adapter(features) + (1 - self.alpha) * features

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        class_features = self._blend(self.text_adapter, self.head.class_features)
        return self.head.logits(self._blend(self.image_adapter, x), class_features)


def _adapter(width: int, hidden: int, output_relu: bool, device: torch.device) -> nn.Sequential:
    """A(f) = ReLU(f W_1) W_2 (then ReLU with `output_relu`), float32."""
    layers = [nn.Linear(width, hidden, bias=False, device=device), nn.ReLU(),
              nn.Linear(hidden, width, bias=False, device=device)]
    return nn.Sequential(*layers, nn.ReLU()) if output_relu else nn.Sequential(*layers)
