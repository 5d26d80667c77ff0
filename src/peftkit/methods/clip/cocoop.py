"""CoCoOp, conditional context optimisation (Zhou et al., 2022, "Conditional Prompt Learning for Vision-Language
Models", CVPR, arXiv:2203.05557): CoOp's context shifted by a token that a small meta-net computes from the image.

    π(x) = h_θ(f̂(x)),   v_m(x) = v_m + π(x),   t_k(x) = [SOS] v_1(x) … v_M(x) [CLASS_k] . [EOS]
    logits_k(x) = s · cos(f(x), g(t_k(x)))

h_θ is Linear–ReLU–Linear from the normalised image feature (width D) through D/16 hidden units to the token width
d, as in the paper; the context v_m (unified, shared by the classes) and θ train, the encoders stay frozen. Each image
gets its own K prompts, so a batch of R images runs R·K text-encoder rows. Fields as CoOp's (`coop.py`); the paper
starts the context from "a photo of a" (init_text, n_ctx=4).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...core.config import register_method
from .classifier import ClassHead
from .coop import PromptDelta, PromptLearning

META_REDUCTION = 16  # the meta-net's hidden width is the image feature width over this


@register_method
class CoCoOp(PromptLearning):
    """CoCoOp config: CoOp's shared context plus a meta-net that shifts it by a token computed from each image."""

    method: ClassVar[str] = "cocoop"
    n_ctx: int = Field(4, gt=0, description="M, the learned context vectors per prompt")
    meta_hidden: int | None = Field(None, gt=0, description="the meta-net's hidden width (None: the image feature "
                                                            "width // 16, as the paper)")

    def build(self, host: nn.Module) -> "CoCoOpDelta":
        return CoCoOpDelta(host, self)


class CoCoOpDelta(PromptDelta):
    """Context `ctx` [M, d] and the meta-net h_θ; each image row gets the class features of its own prompts."""

    def __init__(self, head: ClassHead, config: CoCoOp):
        super().__init__(head, config)
        hidden = config.meta_hidden or head.feature_dim // META_REDUCTION
        if hidden < 1:
            raise ValueError(f"the image features are {head.feature_dim} wide, too narrow for a meta-net of width "
                             f"{head.feature_dim} // {META_REDUCTION}: set meta_hidden")
        device = head.class_features.device
        self.meta_net = nn.Sequential(nn.Linear(head.feature_dim, hidden, device=device), nn.ReLU(),
                                      nn.Linear(hidden, head.token_dim, device=device))

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        shift = self.meta_net(F.normalize(x.float(), dim=-1))  # π(x): [R, d]
        context = self.ctx + shift[:, None]  # v_m(x): [R, M, d]
        rows, classes = context.shape[0], self.head.num_classes
        features = self.head.encode_prompts(self.prompt_ids.repeat(rows, 1), self.context_mask.repeat(rows, 1),
                                            context.repeat_interleave(classes, 0))
        return self.head.logits(x, features.view(rows, classes, -1))
