"""CoOp, context optimisation (Zhou et al., 2022, "Learning to Prompt for Vision-Language Models", IJCV,
arXiv:2109.01134): M learned context vectors take the place of a hand-written prompt's words in CLIP's text encoder.

    t_k = [SOS] [V]_1 … [V]_M [CLASS_k] . [EOS],      logits_k(x) = s · cos(f(x), g(t_k))

g is the frozen text encoder (with its projection), f the frozen image encoder, s = exp(CLIP's logit scale); only
the context vectors [V]_m ∈ R^d train. Unified context: one set shared by every class; class-specific context (CSC):
one set per class. The class name sits at the end (above), in the middle ([V]_1 … [V]_⌊M/2⌋ [CLASS] … [V]_M) or
at the front ([CLASS] [V]_1 … [V]_M). Context starts as N(0, 0.02²) (the paper's init) or as the token embeddings of
`init_text` (e.g. "a photo of a", M = its token count).

Every forward pass encodes the K prompts with the current context (K text-encoder rows), as the paper's training
does. The delta rewrites the class head's logits (`classifier.py`), so routed rows each get their adapter's prompts.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from ...core.config import register_method
from .classifier import ClassHead, ContextPosition, HeadDelta, HeadMethod

INIT_STD = 0.02  # the paper's random init of the context vectors


class PromptLearning(HeadMethod):
    """Fields of the prompt learners (CoOp, CoCoOp): how many context vectors, where the class name goes, the init."""

    n_ctx: int = Field(16, gt=0, description="M, the learned context vectors per prompt")
    class_position: ContextPosition = Field("end", description="where the class name goes among the context vectors")
    init_text: str | None = Field(None, description="start the context as these words' token embeddings (as many "
                                                    "tokens as n_ctx), e.g. 'a photo of a'; None: N(0, 0.02²)")

    def saved_config(self) -> "PromptLearning":
        """The init is spent once the context is trained: a saved context is plain values."""
        return self.model_copy(update={"init_text": None})


@register_method
class CoOp(PromptLearning):
    """CoOp config: M learned context vectors in each class's prompt, shared by the classes or one set per class."""

    method: ClassVar[str] = "coop"
    class_specific: bool = Field(False, description="one set of context vectors per class (CSC) instead of one "
                                                    "shared by all classes")

    def build(self, host: nn.Module) -> "CoOpDelta":
        return CoOpDelta(host, self)


class PromptDelta(HeadDelta):
    """Context vectors `ctx` ([M, d], or [K, M, d] per class) and the class prompts they go into."""

    additive = False

    def __init__(self, head: ClassHead, config: PromptLearning, per_class: bool = False):
        super().__init__(head)
        ids, mask = head.prompt_ids(config.n_ctx, config.class_position)
        self.register_buffer("prompt_ids", ids, persistent=False)  # rebuilt from the class names, never saved
        self.register_buffer("context_mask", mask, persistent=False)
        shape = (head.num_classes, config.n_ctx, head.token_dim) if per_class else (config.n_ctx, head.token_dim)
        self.ctx = nn.Parameter(initial_context(head, config, shape))


class CoOpDelta(PromptDelta):
    """logits = s · cos(f, g(t_k)) with the learned context in every class's prompt."""

    def __init__(self, head: ClassHead, config: CoOp):
        super().__init__(head, config, per_class=config.class_specific)

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        context = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(self.head.num_classes, -1, -1)
        features = self.head.encode_prompts(self.prompt_ids, self.context_mask, context)
        return self.head.logits(x, features)


def initial_context(head: ClassHead, config: PromptLearning, shape: tuple[int, ...]) -> torch.Tensor:
    """Start values of the context vectors, float32, on the text tower's device: N(0, 0.02²), or `init_text`'s token
    embeddings (repeated for each class's own context)."""
    device = head.class_features.device
    if config.init_text is None:
        return torch.randn(shape, device=device) * INIT_STD
    words = head.token_embeddings(config.init_text)
    if words.shape[0] != config.n_ctx:
        raise ValueError(f"init_text {config.init_text!r} is {words.shape[0]} tokens, but n_ctx is {config.n_ctx}: "
                         f"set n_ctx={words.shape[0]}")
    return words.expand(shape).clone()
