"""Learning on real data through the config trainer: SmolLM2 instruction tuning on the chatterbot dialogues
lowers the held-out answer loss below the adapter-off model's; EfficientNet-Lite0 with LoRA on Fashion-MNIST
beats its head alone trained with the same budget."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import peftkit
from peftkit.models import load_smollm2
from peftkit.train import Trainer, TrainResult, config_from_mapping, prepare

from .bbc import MARGIN, adapter_off


def _train(config: dict[str, Any], out: Path, head_only: bool = False) -> tuple[TrainResult, Trainer]:
    """Train as `config` says, into `out`. With `head_only` the adapter stays frozen at its no-op start and only
    the task head's copy trains: the control, with the same head init, data order and steps."""
    config = config_from_mapping({**config, "output": {"dir": str(out), "plot": False}, "progress": False})
    model, processor, task, data = prepare(config)
    if head_only:
        peftkit.set_trainable(model, config.adapter_name, False)
        for head in task.head_modules(config.model):
            model.get_submodule(head).peftkit[config.adapter_name].requires_grad_(True)
    trainer = Trainer(model, task, data, config, processor=processor)
    return trainer.fit(), trainer


def test_smollm2_chatterbot_held_out_loss_falls(tmp_path) -> None:
    """A causal LM has no task head to train, so the control is the adapter switched off after training: the base
    (LoRA starts at zero, so that is also the loss before training)."""
    load_smollm2()  # converts once into the cache
    result, trainer = _train({
        "task": "causal-lm-chat", "model": {"name": "smollm2"},
        "method": {"method": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"name": "chatterbot", "max_length": 64, "train_limit": 24, "eval_limit": 16},
        "optimizer": {"lr": 3e-3}, "schedule": {"epochs": 1, "batch_size": 4}}, tmp_path / "run")
    with peftkit.disabled(result.model):
        off = trainer.evaluate()["loss"]
    before, after = result.before["loss"], result.after["loss"]
    print(f"SmolLM2 + LoRA, chatterbot held-out answer loss {before:.3f} -> {after:.3f} (adapter off {off:.3f}) "
          f"in {result.train_seconds:.1f}s")
    assert abs(off - before) < 1e-4  # the off switch really gives the base back
    # measured 3.68 -> 2.79; the eval set is fixed and the base deterministic, so the gap is the adapter's alone
    assert after < off - 0.3


def test_efficientnet_fashion_mnist_beats_its_head_alone(tmp_path) -> None:
    config = {
        "task": "classify-image", "model": {"name": "efficientnet-lite0"},
        "method": {"method": "lora", "r": 8, "alpha": 16, "targets": ".*_project_conv|_conv_head"},
        # 32 px: ImageNet features of so small an image are weak, so adapting them matters. At 64 px with 448 images
        # the head alone reached 0.725 and LoRA 0.690 (no better); here, measured: LoRA 0.750, head alone 0.555,
        # LoRA switched off after training 0.555
        "data": {"name": "fashion-mnist", "image_size": 32, "train_limit": 896, "eval_limit": 200},
        "optimizer": {"lr": 3e-3}, "schedule": {"epochs": 1, "batch_size": 32}}
    result, trainer = _train(config, tmp_path / "run")
    control, _ = _train(config, tmp_path / "head", head_only=True)
    with adapter_off(result.model, head="_fc"):
        off = trainer.evaluate()["accuracy"]
    before, after, alone = result.before["accuracy"], result.after["accuracy"], control.after["accuracy"]
    print(f"EfficientNet-Lite0 + LoRA, Fashion-MNIST accuracy {before:.3f} -> {after:.3f} in {result.train_seconds:.1f}s; "
          f"head alone {alone:.3f}; adapter switched off after training {off:.3f}")
    assert after > 0.65 and after >= alone + MARGIN  # 200 test images: MARGIN is 10 of them (see tests/bbc.py)
    assert off <= after - 0.1
