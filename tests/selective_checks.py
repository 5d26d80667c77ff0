"""Checks shared by the selective method tests: the base untouched, changes only inside the mask, a refused
phase switch, and the trained share / saved size of a learning run."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit import LoRA, SelectionError
from peftkit.core.registry import adapter_deltas
from peftkit.core.delta import ModuleCopy

from .bbc import BBCRun, assert_beats_controls, fit_bbc


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".peftkit." not in n}


def train_with_weight_decay(model: nn.Module, inputs: Any, name: str = "default", steps: int = 5) -> None:
    """A few AdamW steps with strong weight decay and momentum on adapter `name`."""
    optimizer = torch.optim.AdamW(peftkit.adapter_parameters(model, name), lr=0.05, weight_decay=0.5)
    for _ in range(steps):
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        getattr(out, "logits", out).sin().sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def assert_only_mask_moved(model: nn.Module, base: dict[str, torch.Tensor], name: str = "default") -> None:
    """Merged, adapter `name` changes the base bit for bit only inside its mask (and most entries inside)."""
    assert all(torch.equal(p, base[n]) for n, p in base_state(model).items())  # unmerged: the base is untouched
    inside = {}
    for host_name, _, delta in adapter_deltas(model, name):
        if not isinstance(delta, ModuleCopy):
            for param, diff in delta.diffs():
                inside[f"{host_name}.{param}"] = torch.zeros(base[f"{host_name}.{param}"].numel(), dtype=torch.bool)
                inside[f"{host_name}.{param}"][diff.flat_change()[0]] = True
    peftkit.merge(model, name)
    merged = base_state(model)
    moved = 0
    for key, mask in inside.items():
        assert torch.equal(merged[key].flatten()[~mask], base[key].flatten()[~mask]), key
        moved += int((merged[key].flatten()[mask] != base[key].flatten()[mask]).sum())
    assert moved > 0.9 * sum(int(m.sum()) for m in inside.values())
    peftkit.unmerge(model, name)


def assert_phase_change_refuses_bad_calls(model: nn.Module, change: Callable[[nn.Module, str], object], method: str,
                                          done: str) -> None:
    """`change` (a method's switch of adapter "default" to its sparse phase) refuses another method's adapter,
    a merged adapter, and a second call (message `done`)."""
    peftkit.attach(model, LoRA(r=2, targets=["attn.k"]), "lora", activate=False)
    with pytest.raises(SelectionError, match=f"not {method}"):
        change(model, "lora")
    peftkit.merge(model, "default")
    with pytest.raises(SelectionError, match="merged"):
        change(model, "default")
    peftkit.unmerge(model)
    change(model, "default")
    with pytest.raises(SelectionError, match=done):
        change(model, "default")


def trainable_share(model: nn.Module) -> float:
    """Trained entries of the base (the task head's copy excluded) over all base parameters."""
    counts = peftkit.summary(model)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier.peftkit."))
    return (counts.trainable - head) / (counts.total - counts.trainable)


def saved_kib(model: nn.Module, path: Path) -> float:
    peftkit.save(model, path)
    return sum(f.stat().st_size for f in path.iterdir()) / 1024


def fit_bbc_in_two_phases(config: peftkit.AdapterConfig, path: Path, sparse_epochs: int = 2) -> tuple[BBCRun, float, float]:
    """The method's own two phases in one `run_training` on BBC: one dense epoch at lr 1e-4 (with the method's other
    steps, e.g. Diff pruning's penalty), its switch, then `sparse_epochs` of the sparse phase at 100 × that (1e-2).

    The controls: the head alone for as many epochs at lr 1e-2 (more than the run's head got: its first epoch is at
    lr 1e-4), and the sparse change switched off after training.
    Returns the run's result, the share of the base the sparse phase trains, and the saved size in KiB.
    """
    epochs = 1 + sparse_epochs
    config = config.model_copy(update={"phase1_share": 1 / epochs, "phase2_lr_scale": 100.0})
    result, model, _ = fit_bbc(config, lr=1e-4, epochs=epochs, margin=None)
    share, kib = trainable_share(model), saved_kib(model, path)
    print(f"{config.method}: accuracy {result.accuracy_before:.3f} -> {result.accuracy_after:.3f}, the sparse phase "
          f"trains {100 * share:.3f}% of the base, saved {kib:.0f} KiB")
    assert_beats_controls(result, model, lr=1e-2, epochs=epochs, label=config.method)
    return result, share, kib