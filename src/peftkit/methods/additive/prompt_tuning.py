"""Prompt tuning (Lester et al., 2021, arXiv:2104.08691): a few trainable virtual token embeddings
in front of every input; the whole model stays frozen.

    h = f([P; E(x)]),   P ∈ R^{n × d} trainable,   E the frozen input embeddings

`init`: "random" (N(0, 1), as HF PEFT's RANDOM), "vocab" (the embeddings of random vocabulary
tokens, PEFT's SAMPLE_VOCAB) or "text" (the embeddings of `init_token_ids`, repeated or truncated to
n, as PEFT's TEXT; `PromptTuning.from_text` tokenizes a text). How the virtual tokens enter a
batch (masks, positions, mixed rows) is `core.sequence`'s. Virtual tokens cannot be merged.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ...core.config import register_method
from ...core.hf_peft import PeftKeys
from ...core.sequence import SequenceConfig, SequenceDelta, input_embeddings

_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


@register_method
class PromptTuning(PeftKeys, SequenceConfig):
    """Prompt tuning config: `num_virtual_tokens` trainable embeddings and how they start."""

    method: ClassVar[str] = "prompt_tuning"
    init: Literal["random", "vocab", "text"] = Field("random", description="start values of the virtual tokens")
    init_token_ids: list[int] | None = Field(None, description="token ids whose embeddings start the prompt (init='text')")

    @model_validator(mode="after")
    def _init_ids_match_init(self) -> "PromptTuning":
        if self.init == "text" and not self.init_token_ids:
            raise ValueError("init='text' needs init_token_ids (use PromptTuning.from_text(text, tokenizer))")
        if self.init != "text" and self.init_token_ids is not None:
            raise ValueError(f"init_token_ids is only used with init='text', not init={self.init!r}")
        if self.init_token_ids is not None and min(self.init_token_ids) < 0:
            raise ValueError("init_token_ids must be non-negative token ids")
        return self

    @classmethod
    def from_text(cls, text: str, tokenizer: Any, **fields: Any) -> "PromptTuning":
        """A prompt that starts as the embeddings of `text` (tokenized as PEFT does, with special tokens)."""
        ids = tokenizer(text)["input_ids"]
        if not text or not ids:
            raise ValueError("prompt init text is empty")
        return cls(init="text", init_token_ids=list(ids), **fields)

    def build(self, host: nn.Module) -> "PromptDelta":
        return PromptDelta(host, self)

    def saved_config(self) -> "PromptTuning":
        """The init is spent once the prompt is trained: a saved prompt is plain values."""
        return self.model_copy(update={"init": "random", "init_token_ids": None})

    # --- Hugging Face PEFT interop -------------------------------------------------------
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    def to_peft(self) -> dict[str, Any]:
        return {**self.peft_common(), "prompt_tuning_init": _PEFT_INIT[self.init], "prompt_tuning_init_text": None,
                "tokenizer_name_or_path": None, "tokenizer_kwargs": None}

    @classmethod
    def from_peft(cls, peft: dict[str, Any], modules_to_save: list[str]) -> "PromptTuning":
        cls.check_peft_submodules(peft)
        return cls(num_virtual_tokens=peft["num_virtual_tokens"], modules_to_save=modules_to_save)


def initial_prompt(embedding: nn.Embedding, config: PromptTuning) -> torch.Tensor:
    """[n, d] start values for `config.init` (float32, like PEFT's prompt embedding)."""
    n, vocab = config.num_virtual_tokens, embedding.num_embeddings
    if config.init == "random":
        return torch.randn(n, embedding.embedding_dim, device=embedding.weight.device)
    if config.init == "vocab":
        ids = torch.randint(0, vocab, (n,))
    else:
        if max(config.init_token_ids) >= vocab:
            raise ValueError(f"init_token_ids hold id {max(config.init_token_ids)} but the vocabulary has {vocab} tokens")
        ids = torch.tensor((config.init_token_ids * n)[:n])  # repeated, then truncated to n
    return embedding.weight.detach()[ids.to(embedding.weight.device)].float().clone()


class PromptDelta(SequenceDelta):
    """The trainable prompt P of one adapter."""

    kind = "prompt"

    def __init__(self, model: nn.Module, config: PromptTuning):
        super().__init__(model, config)
        self.prompt_embeddings = nn.Parameter(initial_prompt(input_embeddings(model), config))

    def virtual(self) -> torch.Tensor:
        return self.prompt_embeddings
