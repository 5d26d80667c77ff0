"""Tip-Adapter and Tip-Adapter-F (Zhang et al., 2022, "Tip-Adapter: Training-free Adaption of CLIP for Few-shot
Classification", ECCV, arXiv:2111.03930): a key-value cache of the few-shot training set beside zero-shot CLIP.

    logits(x) = α · exp(−β (1 − f̂ F_trainᵀ)) L_train + s · f̂ W_cᵀ

F_train [N, D]: the normalised image features of the N training images (the keys), L_train [N, K] their one-hot
labels (the values), f̂ the test image's normalised feature, W_c the normalised class text features, s = exp(CLIP's
logit scale) (= 100 in the released models, the constant of the paper's code). α weighs the cache (α = 0: zero-shot
CLIP), β sharpens the affinities. The cache is built, not trained: `build_cache(classifier, name, features, labels)`
after attach. Tip-Adapter-F (`fine_tune=True`) makes the keys trainable parameters (the values stay the labels); the
keys are not renormalised while they train, as in the paper's code. The cache term is added to the class head's
logits (`classifier.py`), so it also adds to another head delta active before it (CoOp + cache).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...core.config import register_method
from ...core.registry import adapter_deltas, get_registry
from .classifier import ClassHead, HeadDelta, HeadMethod


@register_method
class TipAdapter(HeadMethod):
    """Tip-Adapter config: the cache's weight α and sharpness β; `fine_tune` trains the cache keys (Tip-Adapter-F)."""

    method: ClassVar[str] = "tip_adapter"
    alpha: float = Field(1.0, ge=0, description="α, the weight of the cache logits (0: zero-shot CLIP)")
    beta: float = Field(1.0, gt=0, description="β, the sharpness of the affinities exp(−β (1 − f̂ kᵀ))")
    fine_tune: bool = Field(False, description="Tip-Adapter-F: the cache keys are trained (the values stay fixed)")

    def build(self, host: nn.Module) -> "TipAdapterDelta":
        return TipAdapterDelta(host, self)


class TipAdapterDelta(HeadDelta):
    """The cache: `keys` [N, D] (a parameter under fine_tune, else a buffer) and `labels` [N] (class indices)."""

    def __init__(self, head: ClassHead, config: TipAdapter):
        super().__init__(head)
        self.alpha, self.beta, self.fine_tune = config.alpha, config.beta, config.fine_tune
        device = head.class_features.device
        self.set_cache(torch.zeros(0, head.feature_dim, device=device),
                       torch.zeros(0, dtype=torch.long, device=device))

    def set_cache(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Hold `keys` [N, D] and `labels` [N] as the cache (new tensors, so N may change)."""
        if self.fine_tune:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)
        self.register_buffer("labels", labels)

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        if self.labels.numel() == 0:
            raise ValueError("this Tip-Adapter's cache is empty: fill it with peftkit.build_cache(classifier, name, "
                             "features, labels) after attach")
        affinity = F.normalize(x.float(), dim=-1) @ self.keys.T  # f̂ F_trainᵀ: [R, N]
        values = F.one_hot(self.labels, self.head.num_classes).to(affinity.dtype)  # L_train: [N, K]
        return self.alpha * torch.exp(-self.beta * (1 - affinity)) @ values

    def prepare_load(self, saved: dict[str, torch.Tensor]) -> None:
        """A saved cache holds its own N entries: take that size (the shape checks that follow still apply)."""
        keys, labels = saved.get("keys"), saved.get("labels")
        if keys is not None and labels is not None and keys.dim() == 2 and labels.shape == keys.shape[:1]:
            self.set_cache(self.keys.new_zeros(keys.shape[0], self.keys.shape[1]),
                           self.labels.new_zeros(labels.shape[0]))


@torch.no_grad()
def build_cache(classifier: nn.Module, name: str, features: torch.Tensor, labels: torch.Tensor) -> None:
    """Fill Tip-Adapter `name`'s cache: keys the normalised `features` [N, D] (`classifier.image_features` of the
    few-shot training images, averaged over augmentations if you like), values the class indices `labels` [N].

    Replaces the cache (and under fine_tune the keys parameter): make the optimizer after this call."""
    config = get_registry(classifier).require(name)
    if not isinstance(config, TipAdapter):
        raise ValueError(f"adapter {name!r} is a {config.method} adapter, not tip_adapter: only Tip-Adapter has a "
                         "cache")
    delta = next(d for _, _, d in adapter_deltas(classifier, name) if isinstance(d, TipAdapterDelta))
    head = delta.head
    if features.dim() != 2 or features.shape[1] != head.feature_dim:
        raise ValueError(f"cache features must be [N, {head.feature_dim}] (N images, CLIP's projection_dim), "
                         f"got shape {tuple(features.shape)}")
    integral = not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
    if labels.shape != (features.shape[0],) or not integral:
        raise ValueError(f"cache labels must be {features.shape[0]} integer class indices (one per feature row), got "
                         f"a {labels.dtype} tensor of shape {tuple(labels.shape)}")
    if features.shape[0] == 0:
        raise ValueError("the cache needs at least one training image")
    outside = labels[(labels < 0) | (labels >= head.num_classes)]
    if outside.numel():
        raise ValueError(f"cache label {int(outside[0])} is out of range: the classifier has {head.num_classes} "
                         f"classes (labels 0 to {head.num_classes - 1})")
    trainable = delta.keys.requires_grad
    keys = F.normalize(features.float(), dim=-1).to(delta.keys.device)
    delta.set_cache(keys, labels.to(delta.labels.device, torch.long))
    delta.keys.requires_grad_(trainable and delta.fine_tune)
