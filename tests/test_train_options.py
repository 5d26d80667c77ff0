"""Each trainer option and `peftkit train` shortcut changes what it names: the logged lr schedule (scheduler,
warmup_steps, --lr), the clipped gradient norm (max_grad_norm), the steps per epoch (--batch-size), and the
initialisation and data order (--seed). Each test fails if its option is ignored."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from peftkit.cli import main
from peftkit.train import Callback, Trainer, run_training
from tests.train_models import tiny_config, write


def train_records(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "train"]


def expected_factor(scheduler: str, warmup: int, total: int, step: int) -> float:
    """The lr factor at `step`, written out here (not imported) so a change in the trainer cannot hide."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    return {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "constant": 1.0}[scheduler]


@pytest.mark.parametrize("scheduler, warmup", [("cosine", 3), ("linear", 0), ("constant", 2)])
def test_scheduler_and_warmup_shape_the_logged_lr(tmp_path, scheduler: str, warmup: int) -> None:
    config = tiny_config(tmp_path, schedule={"epochs": 2, "batch_size": 4, "scheduler": scheduler,
                                             "warmup_steps": warmup}, optimizer={"lr": 0.02}, eval={"before": False})
    result = run_training(config)
    lrs = [record["lr"] for record in train_records(result.output_dir)]
    assert len(lrs) == result.steps == 8  # 16 rows / batch 4, 2 epochs
    assert lrs == pytest.approx([0.02 * expected_factor(scheduler, warmup, 8, k) for k in range(8)], abs=1e-9)


class GradNorms(Callback):
    """The adapter's total gradient norm after clipping (on_step_end runs before zero_grad)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_step_end(self, trainer: Trainer) -> None:
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


def test_max_grad_norm_clips_the_gradient(tmp_path) -> None:
    norms = {}
    for clip in (None, 1e-3):
        callback = GradNorms()
        run_training(tiny_config(tmp_path / str(clip), optimizer={"lr": 0.02, "max_grad_norm": clip}), callbacks=[callback])
        norms[clip] = callback.norms
    assert min(norms[None]) > 1e-2  # unclipped: far above the limit, so the limit binds at every step
    assert norms[1e-3] == pytest.approx([1e-3] * len(norms[1e-3]), rel=1e-4)


def _cli_run(tmp_path: Path, name: str, *flags: str) -> list[dict]:
    config = write(tmp_path / "tiny.yaml", json.dumps(tiny_config(tmp_path)))
    assert main(["train", str(config), "--output", str(tmp_path / name), "--no-progress", *flags]) == 0
    return train_records(tmp_path / name)


def test_cli_batch_size_and_lr_shortcuts(tmp_path) -> None:
    records = _cli_run(tmp_path, "run", "--batch-size", "4", "--lr", "0.037")
    assert len(records) == 4  # 16 rows / 4 (the config says 8: 2 steps)
    assert records[0]["lr"] == pytest.approx(0.037)  # linear decay starts at the given lr (the default: 2e-3)


def test_cli_seed_reproduces_and_changes_the_run(tmp_path) -> None:
    losses = {name: [r["loss"] for r in _cli_run(tmp_path, name, "--seed", seed)]
              for name, seed in (("a", "3"), ("again", "3"), ("b", "4"))}
    assert losses["a"] == losses["again"]
    assert losses["a"] != losses["b"]  # the seed drives the head and adapter init and the data order
