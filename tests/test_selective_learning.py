"""Selective methods learn BBC News topics on MiniLM-L6, train only their share, and save small files that
load and merge back to the trained model's outputs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
from peftkit import BitFit, ChildTuningD, ChildTuningF, FishDip, FishMask, LastK, LayerNormTuning, PaFi

from .bbc import LEARNS, MAX_LENGTH, bbc_inputs, fit_bbc
from .selective_checks import saved_kib, trainable_share

ENCODER_LINEAR = {"targets": ["type:Linear"], "exclude": ["classifier"]}

# FishMask, Child-Tuning_D and Fish-Dip choose their masks from the Fisher on the run's first training batches
# (their own training steps; Fish-Dip also re-selects every `every` steps), as `peftkit train` runs them.
CASES = {  # name: (config, lr, lowest accepted accuracy, tokens per article)
    "bitfit": (BitFit(targets=["type:Linear", "type:LayerNorm"], exclude=["classifier"]), 1e-2, 0.88,
               64),  # 0.845 at 32 tokens
    "layernorm": (LayerNormTuning(), 1e-2, LEARNS, MAX_LENGTH),
    "lastk": (LastK(k=1), 1e-3, LEARNS, MAX_LENGTH),
    "pafi": (PaFi(fraction=0.005, **ENCODER_LINEAR), 1e-2, LEARNS, MAX_LENGTH),
    "fishmask": (FishMask(fraction=0.005, **ENCODER_LINEAR), 1e-2, 0.88, MAX_LENGTH),
    "fishdip": (FishDip(fraction=0.005, every=20, samples=16, **ENCODER_LINEAR), 1e-2, LEARNS, MAX_LENGTH),
    "child_tuning_d": (ChildTuningD(fraction=0.05, **ENCODER_LINEAR), 1e-3, LEARNS, MAX_LENGTH),
    "child_tuning_f": (ChildTuningF(p=0.3, targets=["query", "value"]), 1e-3, LEARNS, MAX_LENGTH),
}


@pytest.mark.parametrize("case", CASES)
def test_selective_method_learns_bbc(case: str, tmp_path: Path) -> None:
    config, lr, lowest, max_length = CASES[case]
    result, model, _ = fit_bbc(config, lr=lr, max_length=max_length)
    share, kib = trainable_share(model), saved_kib(model, tmp_path / case)
    print(f"{case}: accuracy {result.accuracy_after:.3f}, trains {100 * share:.3f}% of the base, saved {kib:.0f} KiB")
    assert result.accuracy_after > lowest  # and fit_bbc's controls: the head alone, the adapter switched off
    # save -> load -> merge on a fresh base reproduces the trained model's outputs
    from peftkit.models import load_minilm

    fresh, _ = load_minilm(num_labels=5)
    peftkit.load(fresh, tmp_path / case)
    peftkit.merge(fresh)
    x = bbc_inputs(16, max_length)
    model.eval()
    fresh.eval()
    with torch.inference_mode():
        torch.testing.assert_close(fresh(**x).logits, model(**x).logits, rtol=1e-4, atol=1e-4)
