"""CLIP as a K-way image classifier over named classes (zero-shot CLIP, Radford et al., 2021, arXiv:2103.00020),
and the class head every CLIP method of this package sits on.

    logits_k(x) = s · cos(f(x), w_k),   s = exp(CLIP's logit scale) (= 1/τ; 100 in the released models)

f(x) is the projected image feature, w_k the text feature of class k's prompt (`template.format(name)`; with several
templates, the mean of their normalised features: CLIP's prompt ensembling). `CLIPClassifier` wraps a `transformers`
`CLIPModel`: `clip` (vision tower, text tower, projections) and `head`, a `ClassHead` that turns f into the K logits.
The class features are computed once, at construction, from the frozen text tower.

Why a head module: CoOp, CoCoOp, CLIP-Adapter and Tip-Adapter all change how an image feature becomes class logits
(prompts in the text encoder, feature adapters, a cache of training features), so each is a delta on `head` whose
output hook rewrites (CoOp, CoCoOp, CLIP-Adapter) or adds to (Tip-Adapter) the zero-shot logits. As deltas they save,
load, route per row (`peftkit.routed(classifier, names)`: each image row gets its adapter's logits) and combine with
module deltas on the vision tower (LoRA, VPT) like any adapter. Deltas on the text tower are refused by name: the class
features are computed once, so such a delta would never be seen (the text side is adapted through the head methods).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers import CLIPModel

from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.registry import REGISTRY_ATTR
from ...core.targets import TargetError, own_modules

DEFAULT_TEMPLATE = "a photo of a {}."
TEXT_TOWER = ("clip.text_model", "clip.text_projection")  # module names whose deltas the class features never see
ContextPosition = Literal["end", "middle", "front"]


class ClassHead(nn.Module):
    """Class logits of image features, s · f̂ Ŵᵀ; also builds and encodes the prompts of the prompt learners."""

    def __init__(self, clip: CLIPModel, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str]):
        super().__init__()
        self._clip = (clip,)  # a tuple, not an attribute torch would register: the model belongs to the classifier
        self.tokenizer = tokenizer
        self.class_names = tuple(class_names)
        self.name_ids = [_token_ids(tokenizer, name) for name in self.class_names]
        # W: [K, D], in the text tower's device and dtype; not saved (it is recomputed from the base)
        self.register_buffer("class_features", class_text_features(clip, tokenizer, class_names, templates),
                             persistent=False)

    @property
    def clip(self) -> CLIPModel:
        return self._clip[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def feature_dim(self) -> int:
        """D, the width of the projected image and text features."""
        return self.class_features.shape[-1]

    @property
    def token_dim(self) -> int:
        """d, the width of the text encoder's token embeddings (a context vector's width)."""
        return self.clip.text_model.get_input_embeddings().embedding_dim

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logits(image_features, self.class_features)

    def logits(self, image_features: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
        """s · cos(f, w_k), float32 [R, K]; `class_features` [K, D] for every row, or [R, K, D] one set per row."""
        if image_features.shape[-1] != self.feature_dim:
            raise ValueError(f"image features have width {image_features.shape[-1]}, but the class features "
                             f"{self.feature_dim} (CLIP's projection_dim)")
        f = F.normalize(image_features.float(), dim=-1)
        w = F.normalize(class_features.float(), dim=-1)
        scale = self.clip.logit_scale.exp().float()
        return scale * (f @ w.T if w.dim() == 2 else torch.einsum("rd,rkd->rk", f, w))

    def prompt_ids(self, n_ctx: int, position: ContextPosition) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [K, L], context mask [K, L]) of the prompts "[V]_1 … [V]_M name." (CoOp's layout): M context slots
        after the start token ("end": the class name last), around the name ("middle": ⌊M/2⌋ before it) or after it
        ("front"); slot ids are the start token's (never embedded: the context replaces them, and never pooled, unlike
        the end token). Padded with the end token to the longest prompt: causal attention keeps pads out of the
        feature read at the first end token."""
        tokenizer = self.tokenizer
        dot = _token_ids(tokenizer, ".")
        before = {"end": n_ctx, "middle": n_ctx // 2, "front": 0}[position]
        rows = [[tokenizer.bos_token_id] + [None] * before + name + [None] * (n_ctx - before) + dot
                + [tokenizer.eos_token_id] for name in self.name_ids]
        length = max(len(row) for row in rows)
        limit = self.clip.config.text_config.max_position_embeddings
        if length > limit:
            longest = self.class_names[max(range(len(rows)), key=lambda k: len(rows[k]))]
            raise ValueError(f"the prompt of class {longest!r} with {n_ctx} context vectors is {length} tokens long, "
                             f"but CLIP's text encoder reads at most {limit}: use fewer context vectors")
        padded = [row + [tokenizer.eos_token_id] * (length - len(row)) for row in rows]
        mask = torch.tensor([[token is None for token in row] for row in padded])
        ids = torch.tensor([[tokenizer.bos_token_id if token is None else token for token in row] for row in padded])
        device = self.class_features.device
        return ids.to(device), mask.to(device)

    def encode_prompts(self, ids: torch.Tensor, mask: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Text features [R, D] of prompts `ids` [R, L] whose `mask`ed slots hold `context` [R, M, d] in place of
        token embeddings (the text model runs as it is; only its token embedding's output is rewritten)."""
        embedding = self.clip.text_model.get_input_embeddings()

        def substitute(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            return output.masked_scatter(mask.unsqueeze(-1), context.to(output.dtype))

        handle = embedding.register_forward_hook(substitute)
        try:
            return self.clip.get_text_features(input_ids=ids).pooler_output
        finally:
            handle.remove()

    def token_embeddings(self, text: str) -> torch.Tensor:
        """[n, d]: the text's token embeddings (no start or end token), float32, detached."""
        embedding = self.clip.text_model.get_input_embeddings()
        ids = torch.tensor(_token_ids(self.tokenizer, text), device=embedding.weight.device)
        return embedding.weight.detach()[ids].float().clone()


class CLIPClassifier(nn.Module):
    """A `CLIPModel` classifying images into named classes: `classifier(pixel_values)` gives [B, K] logits."""

    def __init__(self, clip: CLIPModel, tokenizer: Any, class_names: Sequence[str],
                 templates: str | Sequence[str] = DEFAULT_TEMPLATE):
        super().__init__()
        if not isinstance(clip, CLIPModel):
            raise TypeError(f"CLIPClassifier wraps a transformers CLIPModel, not a {type(clip).__name__}")
        self.clip = clip
        self.head = ClassHead(clip, tokenizer, _checked_names(class_names), _checked_templates(templates))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, class_names: Sequence[str],
                        templates: str | Sequence[str] = DEFAULT_TEMPLATE, **model_kwargs: Any) -> "CLIPClassifier":
        """CLIP weights and tokenizer from a local directory (`CLIPModel.save_pretrained`'s layout); nothing is
        downloaded."""
        from transformers import CLIPTokenizer

        clip = CLIPModel.from_pretrained(path, local_files_only=True, **model_kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        return cls(clip, tokenizer, class_names, templates)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """f(x): the projected image features [B, D] (unnormalised), through any deltas on the vision tower."""
        return self.clip.get_image_features(pixel_values=pixel_values).pooler_output

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._refuse_text_tower_deltas()
        return self.head(self.image_features(pixel_values))

    def _refuse_text_tower_deltas(self) -> None:
        registry = self.__dict__.get(REGISTRY_ATTR)
        for name, hosts in (registry.hosts.items() if registry is not None else ()):
            seen = [host for host in hosts if host.startswith(TEXT_TOWER)]
            if seen:
                raise ValueError(f"adapter {name!r} sits on CLIP's text tower ({seen[0]}), but the classifier computes "
                                 "its class features once, from the frozen text tower, so the adapter would never be "
                                 "seen: adapt the text side with coop, cocoop or clip_adapter (text=True)")


class HeadMethod(AdapterConfig):
    """Fields of every method on a `CLIPClassifier`'s class head."""

    not_trained_by_run: ClassVar[str | None] = (
        "it adapts a CLIP image classifier (peftkit.CLIPClassifier over a CLIPModel and class names), which no "
        "peftkit train task builds; train it in your own loop (docs/clip.md)")
    targets: Literal["head"] = Field("head", description="the classifier's class head (CLIP methods sit nowhere else)")
    exclude: None = Field(None, description="none: CLIP methods sit on the class head only")

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return (ClassHead,)

    def choose_hosts(self, model: nn.Module) -> list[str]:
        heads = [name for name, module in own_modules(model) if isinstance(module, ClassHead)]
        if not heads:
            raise TargetError(f"{self.method} adapts the class head of a peftkit.CLIPClassifier, and "
                              f"{type(model).__name__} has none: wrap a CLIPModel as CLIPClassifier(clip, tokenizer, "
                              "class_names)")
        return heads


class HeadDelta(Delta):
    """A delta on a `ClassHead`: it reads the image features [R, D] the head gets and rewrites or adds to its logits."""

    def __init__(self, head: ClassHead):
        super().__init__()
        self._head = (head,)  # a tuple: the head (and the CLIP model behind it) is not part of the adapter

    @property
    def head(self) -> ClassHead:
        return self._head[0]


def class_text_features(clip: CLIPModel, tokenizer: Any, class_names: Sequence[str],
                        templates: Sequence[str]) -> torch.Tensor:
    """W [K, D]: the text features of each class's prompt; with several templates, the mean of the normalised ones."""
    features = []
    with torch.no_grad():
        for template in templates:
            batch = tokenizer([template.format(name) for name in class_names], padding=True, return_tensors="pt")
            batch = {key: batch[key].to(clip.logit_scale.device) for key in ("input_ids", "attention_mask")}
            features.append(clip.get_text_features(**batch).pooler_output)
    if len(features) == 1:
        return features[0]
    return torch.stack([F.normalize(f, dim=-1) for f in features]).mean(0)


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _checked_names(class_names: Sequence[str]) -> list[str]:
    names = [class_names] if isinstance(class_names, str) else list(class_names)
    if not names:
        raise ValueError("class_names is empty: a CLIP classifier needs the names of the classes it tells apart")
    bad = [name for name in names if not isinstance(name, str) or not name.strip()]
    if bad:
        raise ValueError(f"class names must be non-empty strings, got {bad[:3]}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"class names {repeated[:3]} appear more than once: each class needs its own name")
    return names


def _checked_templates(templates: str | Sequence[str]) -> list[str]:
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ValueError("templates is empty: give at least one prompt template such as 'a photo of a {}.'")
    bad = [template for template in templates if not isinstance(template, str) or template.count("{}") != 1]
    if bad:
        raise ValueError(f"each template must hold '{{}}' exactly once, where the class name goes; got {bad[:3]}")
    return templates
