"""Config fields for AdapterDrop (`efficient.adapter_drop`) and SparseAdapter pruning (`efficient.sparse_adapter`),
shared by the methods that offer them (LoRA and its variants, bottleneck adapters).

    adapter_drop: {first_layers: 6, robust: false}    the adapter skipped in layers 0..5
    prune: {sparsity: 0.9, method: snip}              90% of each adapter weight tensor pruned before training

Attaching (or loading) applies the layer drop and places the masks; `training_steps` prunes with SNIP on the run's
first batches (magnitude pruning needs no data: it happens at attach), keeps the masks through training and draws
robust AdapterDrop's n per step.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator
from torch import nn

from ..core.training import TrainingContext, TrainingStep
from .adapter_drop import AdapterDrop, drop_steps, install_drop
from .sparse_adapter import Prune, hold_masks, mask_steps, prune_adapter


class DropAndPrune(BaseModel):
    """Mixin for a method config: `adapter_drop` (AdapterDrop) and `prune` (SparseAdapter) options."""

    adapter_drop: AdapterDrop | None = Field(None, description="AdapterDrop: skip the adapter in the first layers "
                                                               "(first_layers, robust, seed)")
    prune: Prune | None = Field(None, description="SparseAdapter: prune the adapter's weights (sparsity, method: "
                                                  "magnitude | snip, seed)")

    @model_validator(mode="after")
    def _options_reach_training(self) -> Any:
        own_steps = type(self).training_steps is not DropAndPrune.training_steps
        if own_steps and (self.adapter_drop is not None or self.prune is not None):
            raise ValueError(f"{self.method} runs training steps of its own; adapter_drop and prune are not "
                             "available with it")
        if self.prune is not None and self.rewrites_base:
            raise ValueError(f"init={self.init!r} rewrites the base weights with the factors; pruning them would "
                             "leave the base inconsistent: prune a plain LoRA")
        return self

    def on_attach(self, model: nn.Module, name: str) -> None:
        install_drop(model, name, self.adapter_drop)
        if self.prune is None:
            return
        if self.prune.method == "magnitude":
            prune_adapter(model, name, self.prune.sparsity, "magnitude", seed=self.prune.seed)
        else:
            hold_masks(model, name)  # SNIP needs data: `training_steps` (or `peftkit.prune_adapter`) prunes

    def training_steps(self, context: TrainingContext) -> list[TrainingStep]:
        if self.prune is not None and self.prune.method == "snip":
            prune_adapter(context.model, context.adapter, self.prune.sparsity, "snip", context.batches,
                          context.loss_fn, self.prune.seed)
        return [*mask_steps(context.model, context.adapter),
                *drop_steps(context.model, context.adapter, self.adapter_drop)]

    def peft_refusal(self) -> str | None:
        """Why PEFT's format cannot hold this adapter (its layer drop); None when it can (pruned tensors are saved
        dense there, with the same outputs)."""
        if self.adapter_drop is not None and self.adapter_drop.first_layers > 0:
            return (f"adapter_drop.first_layers={self.adapter_drop.first_layers}: PEFT has no AdapterDrop, so the "
                    "adapter would act in every layer there; save it in peftkit format")
        return None
