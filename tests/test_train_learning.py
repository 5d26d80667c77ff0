"""Learning on real data through `run_training`: SmolLM2 instruction tuning on the chatterbot dialogues
lowers the held-out answer loss; EfficientNet-Lite0 with LoRA on Fashion-MNIST beats its starting accuracy."""
from __future__ import annotations

import pytest

from peftkit.train import run_training


def test_smollm2_chatterbot_held_out_loss_falls(tmp_path) -> None:
    pytest.importorskip("peftkit.models").load_smollm2()  # converts once into the cache
    result = run_training({
        "task": "causal-lm-chat", "model": {"name": "smollm2"},
        "method": {"method": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"name": "chatterbot", "max_length": 64, "train_limit": 24, "eval_limit": 16},
        "optimizer": {"lr": 3e-3}, "schedule": {"epochs": 1, "batch_size": 4},
        "output": {"dir": str(tmp_path / "run"), "plot": False}, "progress": False})
    before, after = result.before["loss"], result.after["loss"]
    print(f"SmolLM2 + LoRA, chatterbot held-out answer loss {before:.3f} -> {after:.3f} in {result.train_seconds:.1f}s")
    assert after < before - 0.3


def test_efficientnet_fashion_mnist_accuracy_rises(tmp_path) -> None:
    result = run_training({
        "task": "classify-image", "model": {"name": "efficientnet-lite0"},
        "method": {"method": "lora", "r": 8, "alpha": 16, "targets": ".*_project_conv|_conv_head"},
        "data": {"name": "fashion-mnist", "image_size": 64, "train_limit": 448, "eval_limit": 200},
        "optimizer": {"lr": 3e-3}, "schedule": {"epochs": 1, "batch_size": 32},
        "output": {"dir": str(tmp_path / "run"), "plot": False}, "progress": False})
    before, after = result.before["accuracy"], result.after["accuracy"]
    print(f"EfficientNet-Lite0 + LoRA, Fashion-MNIST accuracy {before:.3f} -> {after:.3f} in {result.train_seconds:.1f}s")
    assert after > before + 0.4 and after > 0.55
