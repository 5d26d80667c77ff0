"""Checkpoints: resuming after an interruption gives exactly the uninterrupted run, and a checkpoint is
either complete or absent (a crash while writing one leaves the previous one intact)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
import peftkit.core.io
from peftkit.train import Callback, TrainConfigError, run_training
from tests.train_models import tiny_config


class Interrupt(Exception):
    pass


class CrashAfter(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer) -> None:
        if trainer.step == self.step:
            raise Interrupt(f"simulated crash after step {trainer.step}")


QV = ["query", "value"]
METHODS = {  # dropout on: the restored RNG state matters
    "lora": {"method": "lora", "r": 2, "dropout": 0.2, "targets": QV},
    "fishmask": {"method": "fishmask", "fraction": 0.02, "targets": QV},  # a selection on data before training
    "adalora": {"method": "adalora", "init_r": 4, "target_r": 2, "dropout": 0.2, "targets": QV,  # a rank schedule
                "tinit": 2, "tfinal": 2, "deltaT": 2},
}


def resumable_config(tmp_path: Path, name: str, method: str = "lora") -> dict:
    # 48 rows / batch 8 = 6 steps per epoch, 2 epochs.
    return tiny_config(tmp_path / name, method=METHODS[method],
                       data={"train_limit": 48, "eval_limit": 16}, schedule={"epochs": 2, "batch_size": 8},
                       optimizer={"lr": 5e-2}, output={"dir": str(tmp_path / name), "save_every_steps": 4, "plot": True})


def metric_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]  # timing differs


def assert_same_run(a, b) -> None:
    tensors_a, tensors_b = (load_file(str(r.adapter_dir / "adapter.safetensors")) for r in (a, b))
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        assert torch.equal(tensors_a[key], tensors_b[key]), key
    assert (a.before, a.after, a.best, a.steps, a.epochs) == (b.before, b.after, b.best, b.steps, b.epochs)
    assert metric_records(a.output_dir) == metric_records(b.output_dir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run_training(resumable_config(tmp_path_factory.mktemp("train"), "whole"))


@pytest.fixture(scope="module")
def uninterrupted_runs(tmp_path_factory):
    return {method: run_training(resumable_config(tmp_path_factory.mktemp("train"), "whole", method))
            for method in METHODS}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("crash_step", [5, 9])  # resume from step 4 (epoch 0) / step 8 (epoch 1, after an eval)
def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, uninterrupted_runs, method, crash_step) -> None:
    uninterrupted = uninterrupted_runs[method]
    config = resumable_config(tmp_path, "resumed", method)
    with pytest.raises(Interrupt):
        run_training(config, callbacks=[CrashAfter(crash_step)])
    state = json.loads((tmp_path / "resumed/checkpoints/last/trainer_state.json").read_text())
    assert state["step"] == crash_step - 1
    resumed = run_training(config, resume=True)
    assert resumed.steps == 12 and uninterrupted.steps == 12
    assert uninterrupted.after["accuracy"] != uninterrupted.before["accuracy"]  # it did train
    assert_same_run(resumed, uninterrupted)


def test_checkpoint_is_loadable_as_an_adapter(uninterrupted) -> None:
    for which in ("last", "best"):
        ckpt = uninterrupted.output_dir / "checkpoints" / which
        config, tensors, name = peftkit.read_adapter(ckpt)
        assert name == "default" and config.method == "lora" and tensors
    assert (uninterrupted.output_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_refuses_a_changed_config(tmp_path) -> None:
    config = resumable_config(tmp_path, "run")
    config["schedule"]["epochs"] = 1
    run_training(config)
    config["optimizer"]["lr"] = 1e-3
    with pytest.raises(peftkit.train.TrainConfigError, match=r"config changed since the checkpoint \(optimizer\.lr\)"):
        run_training(config, resume=True)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, uninterrupted, monkeypatch) -> None:
    """The disk fills up half-way through writing the second checkpoint's training state."""
    real_save_file = peftkit.core.atomic.save_file
    writes = []

    def failing_save_file(tensors, filename, metadata=None):
        if filename.endswith("training.safetensors"):
            writes.append(filename)
            if len(writes) == 2:
                Path(filename).write_bytes(b"half a file")
                raise OSError("No space left on device")
        real_save_file(tensors, filename, metadata=metadata)

    config = resumable_config(tmp_path, "resumed")
    monkeypatch.setattr(peftkit.core.atomic, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        run_training(config)
    monkeypatch.setattr(peftkit.core.atomic, "save_file", real_save_file)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last"]  # no temporary or half-written directory
    assert json.loads((checkpoints / "last" / "trainer_state.json").read_text())["step"] == 4
    load_file(str(checkpoints / "last" / "training.safetensors"))  # complete
    assert_same_run(run_training(config, resume=True), uninterrupted)


@pytest.mark.parametrize("method, reason", [
    ({"method": "ltsft", "fraction": 0.02, "targets": QV}, "restarted its optimizer at step 6"),
    ({"method": "fishdip", "fraction": 0.02, "targets": QV, "samples": 4, "every": 3}, "Reselect changes the adapter"),
])
def test_resume_is_refused_by_name_where_a_checkpoint_cannot_hold_the_run(tmp_path, method, reason) -> None:
    config = tiny_config(tmp_path, method=method, data={"train_limit": 48, "eval_limit": 16},
                         schedule={"epochs": 2, "batch_size": 8}, output={"dir": str(tmp_path / "run"), "save_every_steps": 4})
    with pytest.raises(Interrupt):
        run_training(config, callbacks=[CrashAfter(9)])
    with pytest.raises(TrainConfigError, match=reason):
        run_training(config, resume=True)


def test_relora_asks_for_no_saved_adapter_and_no_best_checkpoint(tmp_path) -> None:
    config = tiny_config(tmp_path, method={"method": "relora", "r": 2, "targets": QV, "restart_every": 3})
    with pytest.raises(TrainConfigError, match="relora writes into the base weights.*output.save: false"):
        run_training(config)


def test_two_phase_run_chooses_its_best_epoch_in_phase_two(tmp_path) -> None:
    """An eval in phase 1 must not become the best checkpoint: it holds the dense adapter, not phase 2's."""
    config = tiny_config(tmp_path, method={"method": "ltsft", "fraction": 0.02, "targets": QV},
                         data={"train_limit": 48, "eval_limit": 16}, schedule={"epochs": 3, "batch_size": 8},
                         optimizer={"lr": 5e-2})  # 18 steps, the phase change after step 9, evals after 6, 12, 18
    result = run_training(config)
    assert result.best["step"] in (12, 18) and result.steps == 18
