"""Round trips with Hugging Face PEFT, both directions, for methods whose files interchange (LoHa, LoKr, OFT).

Callers mark their tests with `checks.needs_peft`: `peft` is imported here only inside the functions.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import peftkit

from .checks import model_output

ATOL = 1e-5


class ConvNet(nn.Sequential):
    """A 3x3 Conv2d (padded, strided) and a Linear head: the conv hosts' case."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6))


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3,
        initializer_range=0.2)).eval()  # logits far from 0


def bert_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 100, (3, 7))
    mask = torch.ones_like(ids)
    ids[0, 5:], mask[0, 5:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def image_inputs() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8)


def assert_peft_loads_in_peftkit(make: Callable[[], nn.Module], inputs: Any, peft_config: Any, marker: str,
                                 path: Path, expected_type: type) -> nn.Module:
    """A PEFT model with perturbed adapter tensors (names containing `marker`), saved by PEFT, loads into a fresh
    copy of the base with the same outputs; returns the loaded model."""
    import peft

    base = make().eval()
    fresh = copy.deepcopy(base)
    bare = model_output(base, inputs)
    model = peft.get_peft_model(base, peft_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.copy_(torch.randn_like(p) * 0.3)
    expected = model_output(model, inputs)
    assert not torch.allclose(expected, bare, atol=1e-3), "the PEFT adapter must change the outputs"
    model.save_pretrained(path)
    peftkit.load(fresh, path)
    assert isinstance(peftkit.adapters(fresh)["default"], expected_type)
    torch.testing.assert_close(model_output(fresh, inputs), expected, atol=ATOL, rtol=1e-5)
    return fresh


def assert_peftkit_loads_in_peft(make: Callable[[], nn.Module], inputs: Any, config: peftkit.AdapterConfig,
                                 path: Path, randomize: Callable[[nn.Module], None]) -> dict[str, Any]:
    """Our adapter, randomised, saved in PEFT format, loads with `peft.PeftModel.from_pretrained` with the same
    outputs; returns the saved adapter_config.json."""
    import json

    import peft

    base = make().eval()
    fresh = copy.deepcopy(base)
    bare = model_output(base, inputs)
    peftkit.attach(base, config)
    randomize(base)
    expected = model_output(base, inputs)
    assert not torch.allclose(expected, bare, atol=1e-3), "the adapter must change the outputs"
    peftkit.save(base, path, format="peft")
    theirs = peft.PeftModel.from_pretrained(fresh, path).eval()
    torch.testing.assert_close(model_output(theirs, inputs), expected, atol=ATOL, rtol=1e-5)
    return json.loads((path / "adapter_config.json").read_text())
