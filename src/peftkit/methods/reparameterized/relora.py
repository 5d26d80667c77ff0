"""ReLoRA: high-rank training through low-rank updates (Lialin et al., 2023, arXiv:2307.05695).

    every T steps:  W0 ← W0 + s·B A;   A ← fresh init, B ← 0;   prune the optimizer state of A and B

Training a LoRA adapter and periodically folding it into the base ("merge-and-reinit")
sums rank-r updates, so the total update can be high rank. A restart leaves the outputs
unchanged (ΔW moves into W0 and the fresh B A is 0); the optimizer state of the factors is
reset by magnitude pruning (the paper prunes 99%), so the next cycle is not steered by
the last one. The paper also re-warms the learning rate after each restart (a jagged
schedule): that is the caller's scheduler.

Restarts change the base weights for good; that is the training. Removing the adapter
afterwards drops only the part trained since the last restart, and every row sees the
updated base: bare-base rows and other adapters included. A saved adapter likewise holds
only that last part, so keep the base too, or `unload` the model at the end (the paper's
final model).
"""
from __future__ import annotations

import torch
from torch import nn

from ...core.registry import adapter_deltas
from ...core.registry import get_registry
from .lora import LoRA, LoRADelta


@torch.no_grad()
def relora_restart(model: nn.Module, name: str, optimizer: torch.optim.Optimizer, prune_ratio: float = 0.99) -> None:
    """Merge LoRA adapter `name` into the base, re-initialise it and prune its factors' optimizer state.

    `prune_ratio` is the share of each moment tensor zeroed, smallest magnitudes first (1.0: full reset).
    """
    if not 0.0 <= prune_ratio <= 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1], got {prune_ratio}")
    registry = get_registry(model)
    config = registry.require(name)
    if not isinstance(config, LoRA) or config.rewrites_base:
        raise ValueError(f"ReLoRA restarts a LoRA adapter with an untouched base; {name!r} is a "
                         f"{config.method} adapter{' with PiSSA init' if config.rewrites_base else ''}")
    if name in registry.merged:
        raise ValueError(f"adapter {name!r} is merged; unmerge it before a ReLoRA restart")
    for _, host, delta in adapter_deltas(model, name):
        if not isinstance(delta, LoRADelta):  # task-head copies train on as they are
            continue
        delta.merge_into(host)
        delta._initialise(host, config.init)  # the method's own init: a fresh A (an Embedding's: B)
        if delta.kind != "embedding":
            delta.lora_B.zero_()
        for factor in (delta.lora_A, delta.lora_B):
            _prune_state(optimizer.state.get(factor, {}), factor, prune_ratio)


def _prune_state(state: dict, param: torch.Tensor, ratio: float) -> None:
    """Zero the smallest `ratio` of each per-element moment (exp_avg, exp_avg_sq, momentum...) by magnitude."""
    for value in state.values():
        if not torch.is_tensor(value) or value.shape != param.shape:  # e.g. Adam's scalar step count
            continue
        count = int(ratio * value.numel())
        if count >= value.numel():
            value.zero_()
        elif count > 0:
            threshold = value.abs().flatten().kthvalue(count).values
            value.masked_fill_(value.abs() <= threshold, 0.0)
