"""Checks shared by the selective method tests: the base untouched, changes only inside the mask, a refused
phase switch, Fisher batches from the BBC subset, and the trained share / saved size of a learning run."""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit import LoRA, SelectionError
from peftkit.core.registry import adapter_deltas
from peftkit.core.delta import ModuleCopy
from peftkit.train.classify import encode

from .bbc import MAX_LENGTH, assert_beats_controls, bbc_subset, fit_bbc

FISHER_ROWS = 64  # training examples the Fisher is computed on


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


@lru_cache(maxsize=1)
def fisher_batches() -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    from peftkit.models import load_minilm

    train = bbc_subset()[0]
    inputs = encode(load_minilm()[1], train["text"][:FISHER_ROWS], MAX_LENGTH)
    labels = torch.tensor(train["label"][:FISHER_ROWS])
    return [({k: v[i:i + 16] for k, v in inputs.items()}, labels[i:i + 16]) for i in range(0, FISHER_ROWS, 16)]


def trainable_share(model: nn.Module) -> float:
    """Trained entries of the base (the task head's copy excluded) over all base parameters."""
    counts = peftkit.summary(model)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier.peftkit."))
    return (counts.trainable - head) / (counts.total - counts.trainable)


def saved_kib(model: nn.Module, path: Path) -> float:
    peftkit.save(model, path)
    return sum(f.stat().st_size for f in path.iterdir()) / 1024


def fit_bbc_in_two_phases(config: peftkit.AdapterConfig, switch: Callable[[nn.Module], object], path: Path,
                          on_attach: Callable[[nn.Module], dict[str, Any]] | None = None,
                          sparse_epochs: int = 2) -> tuple[Any, Any, float, float]:
    """A dense phase on BBC (1 epoch, lr 1e-4), `switch(model)`, then the sparse phase (lr 1e-2).

    The controls: the head alone for one epoch more at lr 1e-2 than the sparse phase (more than the run's head
    got: its dense epoch is at lr 1e-4), and the sparse change switched off after training.
    Returns both phases' results, the share of the base the sparse phase trains, and the saved size in KiB.
    """
    from peftkit.train.classify import ClassifyConfig, train_classifier

    dense, model, tokenizer = fit_bbc(config, lr=1e-4, epochs=1, on_attach=on_attach, margin=None)
    switch(model)
    train, test = bbc_subset()
    sparse = train_classifier(model, tokenizer, train["text"], train["label"], test["text"], test["label"],
                              ClassifyConfig(epochs=sparse_epochs, batch_size=16, lr=1e-2, max_length=MAX_LENGTH), progress=False)
    share, kib = trainable_share(model), saved_kib(model, path)
    print(f"{config.method}: dense phase accuracy {dense.accuracy_after:.3f}; sparse phase {sparse.accuracy_before:.3f} "
          f"-> {sparse.accuracy_after:.3f}, trains {100 * share:.3f}% of the base, saved {kib:.0f} KiB")
    assert_beats_controls(sparse, model, tokenizer, lr=1e-2, epochs=sparse_epochs + 1, label=config.method)
    return dense, sparse, share, kib
