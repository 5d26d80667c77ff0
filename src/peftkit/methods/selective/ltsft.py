"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning (Ansell, Ponti, Korhonen & Vulić, 2022, "Composable Sparse
Fine-Tuning for Cross-Lingual Transfer", arXiv:2110.07560).

    phase 1: θ1 = train(θ0) on every targeted parameter;   M = the K entries of largest |θ1 − θ0|
    phase 2: θ ← θ0 (reset);   θ2 = θ0 + M ⊙ Δ,  Δ trained from 0;   K = round(f·N)

The method's training steps run it in one training run (`peftkit train`, `MultiJobTrainer`, the Hugging
Face `Trainer` callback): the first half of the optimizer steps is phase 1, then `ltsft_select` keeps the K
most changed entries and resets everything, and the second half trains them from a fresh optimizer and
learning-rate schedule (`phase1_share` moves the split; `phase2_lr_scale` multiplies phase 2's learning rate: the
dense phase 1 wants a fine-tuning-sized step, the sparse phase 2 a larger one). By hand: train, call `ltsft_select(model, name)`, build a new optimizer, train again.

Phase 1 stores each targeted parameter's change as a dense block, so |θ1 − θ0| is the block itself and
costs nothing to compute; its memory is that of full fine-tuning of the targets. The reset follows the
authors' code: every trainable tensor of the adapter returns to its value before phase 1, the task-head
copies (`modules_to_save`) included. K is exact (ties broken arbitrarily; the reference code's
`>= threshold` may keep more). Phase 2 stores indices + values and merges exactly.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ...core.registry import adapter_deltas
from ...core.config import register_method
from ...core.delta import ModuleCopy
from ...core.registry import get_registry
from ...core.training import TrainingContext, TrainingStep, TwoPhases
from .selection import Fraction, SelectionError, install_masks, top_fraction
from .mask import Mask
from .sparse import SelectiveConfig, whole_masks


@register_method
class LTSFT(TwoPhases, SelectiveConfig):
    """LT-SFT config: the share `fraction` of the targets' parameters that phase 2 trains, and how the run is split."""

    method: ClassVar[str] = "ltsft"
    fraction: Fraction = 0.005

    def masks(self, hosts: dict[str, nn.Module]) -> dict[str, Mask]:
        return whole_masks(hosts, self.param_names)  # phase 1: everything targeted trains

    def training_steps(self, context: TrainingContext) -> list[TrainingStep]:
        """Phase 1 for `phase1_share` of the run's steps, the selection, then phase 2 from a fresh optimizer."""
        return [self.phase_change(context, lambda: ltsft_select(context.model, context.adapter))]


@torch.no_grad()
def ltsft_select(model: nn.Module, name: str = "default") -> dict[str, Mask]:
    """End phase 1 of LT-SFT adapter `name`: keep the `fraction` most changed entries, reset, return the masks."""
    registry = get_registry(model)
    config = registry.require(name)
    if not isinstance(config, LTSFT):
        raise SelectionError(f"adapter {name!r} is {config.method}, not ltsft")
    if name in registry.merged:
        raise SelectionError(f"adapter {name!r} is merged; unmerge it before selecting")
    changes, heads = {}, []
    for host_name, host, delta in adapter_deltas(model, name):
        if isinstance(delta, ModuleCopy):
            heads.append((host, delta))
            continue
        for param, diff in delta.diffs():
            if not diff.is_dense:
                raise SelectionError(f"adapter {name!r} is already in phase 2 ({host_name}.{param} holds a sparse "
                                     "change); LT-SFT selects once, after phase 1")
            changes[f"{host_name}.{param}"] = diff.values.abs()  # the dense block is θ1 − θ0
    masks = top_fraction(changes, config.fraction)
    install_masks(model, name, masks)  # new diffs start at 0: the selected entries are back at θ0
    for host, head in heads:  # the copies start over from the (frozen, untouched) module they copied
        for key, tensor in [*head.module.named_parameters(), *head.module.named_buffers()]:
            tensor.copy_(host.get_parameter(key) if isinstance(tensor, nn.Parameter) else host.get_buffer(key))
    return masks
