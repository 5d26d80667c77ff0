"""P-tuning (Liu et al., 2021, arXiv:2103.10385, "GPT Understands, Too"): virtual tokens produced
by a small prompt encoder, in front of every input; the model stays frozen.

    h = f([g(P); E(x)]),   g = MLP (Linear-ReLU-Linear-ReLU-Linear) or bi-LSTM then MLP

The encoder only helps training (it couples the virtual tokens). As in HF PEFT, a saved adapter
holds the encoded prompt g(P) alone (`prompt_embeddings`) and loads with `encoded=True`: a fixed
prompt that is used as it is (PEFT's inference mode). Training cannot resume through the encoder
from a saved file; a loaded prompt still trains directly, as a prompt-tuning prompt would.
The encoder's layout follows PEFT's PromptEncoder (same layers, N(0, 1) start of P).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ...core.config import register_method
from ...core.hf_peft import PeftKeys
from ...core.sequence import SequenceConfig, SequenceDelta, input_embeddings

_PEFT_ENCODER = {"mlp": "MLP", "lstm": "LSTM"}


@register_method
class PTuning(PeftKeys, SequenceConfig):
    """P-tuning config: virtual tokens, the prompt encoder's type and size, or the saved encoded form."""

    method: ClassVar[str] = "p_tuning"
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="the prompt encoder g: an MLP, or a bi-LSTM then an MLP")
    encoder_hidden_size: int | None = Field(None, gt=0, description="g's hidden width (default: the embedding width)")
    encoder_num_layers: int = Field(2, gt=0, description="LSTM layers (the MLP always has PEFT's three Linear layers)")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="dropout between LSTM layers")
    encoded: bool = Field(False, description="hold the encoded prompt g(P) itself, without the encoder (saved form)")

    def build(self, host: nn.Module) -> "PTuningDelta":
        return PTuningDelta(host, self)

    def saved_config(self) -> "PTuning":
        return self.model_copy(update={"encoded": True})

    # --- Hugging Face PEFT interop -------------------------------------------------------
    peft_type: ClassVar[str] = "P_TUNING"

    def to_peft(self) -> dict[str, Any]:
        return {**self.peft_common(), "encoder_reparameterization_type": _PEFT_ENCODER[self.encoder],
                "encoder_hidden_size": self.encoder_hidden_size, "encoder_num_layers": self.encoder_num_layers,
                "encoder_dropout": self.encoder_dropout}

    @classmethod
    def from_peft(cls, peft: dict[str, Any], modules_to_save: list[str]) -> "PTuning":
        """PEFT always saves the encoded prompt, so a PEFT adapter loads in its encoded form."""
        cls.check_peft_submodules(peft)
        encoder = {v: k for k, v in _PEFT_ENCODER.items()}.get(peft.get("encoder_reparameterization_type", "MLP"))
        if encoder is None:
            raise ValueError(f"PEFT P_TUNING encoder {peft['encoder_reparameterization_type']!r} is unknown (MLP or LSTM)")
        return cls(num_virtual_tokens=peft["num_virtual_tokens"], encoder=encoder, encoded=True,
                   encoder_hidden_size=peft.get("encoder_hidden_size"), encoder_num_layers=peft.get("encoder_num_layers", 2),
                   encoder_dropout=peft.get("encoder_dropout", 0.0), modules_to_save=modules_to_save)


class PTuningDelta(SequenceDelta):
    """Trainable P and the encoder g (training form), or the encoded prompt g(P) alone (`encoded`)."""

    kind = "prompt"

    def __init__(self, model: nn.Module, config: PTuning):
        super().__init__(model, config)
        width = input_embeddings(model).embedding_dim
        if config.encoded:
            self.prompt_embeddings = nn.Parameter(torch.zeros(config.num_virtual_tokens, width))
            return
        hidden = config.encoder_hidden_size or width
        self.embedding = nn.Parameter(torch.randn(config.num_virtual_tokens, width))
        self.lstm_head = (nn.LSTM(width, hidden, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                  bidirectional=True, batch_first=True) if config.encoder == "lstm" else None)
        mlp_in = 2 * hidden if config.encoder == "lstm" else width
        mlp_hidden = 2 * hidden if config.encoder == "lstm" else hidden
        layers = [nn.Linear(mlp_in, mlp_hidden), nn.ReLU()]
        if config.encoder == "mlp":
            layers += [nn.Linear(mlp_hidden, mlp_hidden), nn.ReLU()]
        self.mlp_head = nn.Sequential(*layers, nn.Linear(mlp_hidden, width))

    def virtual(self) -> torch.Tensor:
        if not hasattr(self, "mlp_head"):
            return self.prompt_embeddings
        tokens = self.embedding if self.lstm_head is None else self.lstm_head(self.embedding[None])[0][0]
        return self.mlp_head(tokens)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.virtual().detach()}
