"""Prefix tuning (Li & Liang, 2021, arXiv:2101.00190) and P-tuning v2 (Liu et al., 2022,
arXiv:2110.07602, the same prefixes on understanding tasks): trainable keys and values in front of
every attention layer's own; the model stays frozen.

    attention_l(x) = softmax(q [P_k^l; K]ᵀ / √d) [P_v^l; V],   P^l_k, P^l_v ∈ R^{n × d_kv} trainable

The prefixes enter as a `past_key_values` cache (see `core.sequence`), so generation puts them in
the cache once. `projection` reparameterizes them in training as in the paper and PEFT's
prefix_projection: P = MLP(E) with E ∈ R^{n × d}, MLP = Linear-Tanh-Linear. The MLP is discarded at
save time: a saved adapter holds the computed prefixes (PEFT's `prompt_embeddings`, [n, layers·2·d_kv],
laid out per layer as key then value) and loads with `projection=False`. With grouped-query
attention d_kv = key/value heads × head size, as in PEFT.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from ...core.config import register_method
from ...core.hf_peft import PeftKeys
from ...core.sequence import SequenceConfig, SequenceDelta, kv_geometry


@register_method
class PrefixTuning(PeftKeys, SequenceConfig):
    """Prefix tuning config: prefix length, and the optional MLP reparameterization used in training."""

    method: ClassVar[str] = "prefix_tuning"
    projection: bool = Field(False, description="compute the prefixes with an MLP in training (saved without it)")
    encoder_hidden_size: int | None = Field(None, gt=0, description="the MLP's hidden width (default: the kv width)")

    def build(self, host: nn.Module) -> "PrefixDelta":
        return PrefixDelta(host, self)

    def saved_config(self) -> "PrefixTuning":
        return self.model_copy(update={"projection": False, "encoder_hidden_size": None})

    # --- Hugging Face PEFT interop -------------------------------------------------------
    peft_type: ClassVar[str] = "PREFIX_TUNING"

    def to_peft(self) -> dict[str, Any]:
        return {**self.peft_common(), "prefix_projection": self.projection, "encoder_hidden_size": self.encoder_hidden_size}

    @classmethod
    def from_peft(cls, peft: dict[str, Any], modules_to_save: list[str]) -> "PrefixTuning":
        """PEFT saves the computed prefixes even with prefix_projection, so they load without the MLP."""
        cls.check_peft_submodules(peft)
        return cls(num_virtual_tokens=peft["num_virtual_tokens"], modules_to_save=modules_to_save)


class PrefixDelta(SequenceDelta):
    """The prefixes of one adapter: trainable directly, or through the MLP (`projection`)."""

    kind = "prefix"

    def __init__(self, model: nn.Module, config: PrefixTuning):
        super().__init__(model, config)
        self.geometry = kv_geometry(model)  # (layers, kv heads, head size)
        layers, heads, head_dim = self.geometry
        width = heads * head_dim
        n = config.num_virtual_tokens
        if config.projection:
            hidden = config.encoder_hidden_size or width
            self.embedding = nn.Parameter(torch.randn(n, width))
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, layers * 2 * width))
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(n, layers * 2 * width))  # N(0, 1), as PEFT's

    def flat(self) -> torch.Tensor:
        """[n, layers·2·d_kv], PEFT's saved layout."""
        return self.mlp(self.embedding) if hasattr(self, "mlp") else self.prompt_embeddings

    def virtual(self) -> torch.Tensor:
        return self.flat().view(self.num_virtual_tokens, self.geometry[0], 2, *self.geometry[1:])

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.flat().detach()}
