"""LT-SFT: phase 1 trains every targeted entry, the selection keeps exactly the most changed ones and resets,
phase 2 moves nothing else (AdamW with weight decay included), files, merge, routing, learning on BBC News."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import LTSFT, LoRA, MaskError, ltsft_select
from peftkit.methods.selective.selection import install_masks

from .checks import assert_routed_grads_match_rows, assert_routed_matches_rows, model_output
from .conftest import randomize
from .selective_checks import (assert_only_mask_moved, assert_phase_change_refuses_bad_calls, base_state,
                               fit_bbc_in_two_phases, train_with_weight_decay)

TARGETS = ["attn.q", "attn.k", "attn.v", "ffn.0", "ffn.2"]


# --- phase 1 and the selection -------------------------------------------------------------------------------------

def _phase_one(tiny: nn.Module, fraction: float = 0.1, **fields: Any) -> nn.Module:
    peftkit.attach(tiny, LTSFT(targets=TARGETS, fraction=fraction, **fields))
    randomize(tiny)  # stands in for phase-1 training: every dense block changed
    return tiny


def test_phase_one_trains_every_targeted_weight_and_bias(tiny) -> None:
    peftkit.attach(tiny, LTSFT(targets=TARGETS, modules_to_save=["head"]))
    targeted = sum(p.numel() for n, p in tiny.named_parameters() if n.rpartition(".")[0] in TARGETS)
    head = sum(p.numel() for p in tiny.head.parameters(recurse=False))
    assert peftkit.summary(tiny).trainable == targeted + head


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_selection_keeps_exactly_the_most_changed_entries(tiny, fraction: float) -> None:
    _phase_one(tiny, fraction)
    changes = {f"{h}.{p}": d.values.detach().clone() for h in TARGETS for p, d in tiny.get_submodule(h).peftkit["default"].diffs()}
    flat = torch.cat([c.abs().flatten() for c in changes.values()])
    count = max(1, round(fraction * flat.numel()))
    masks = ltsft_select(tiny)
    chosen = torch.cat([changes[k].abs().flatten()[tiny.get_submodule(k.rpartition(".")[0]).peftkit["default"]
                                                   .get_submodule(k.rpartition(".")[2]).flat_change()[0]] for k in changes])
    assert chosen.numel() == count == sum(d.size() for h in TARGETS for _, d in tiny.get_submodule(h).peftkit["default"].diffs())
    torch.testing.assert_close(chosen.sort().values, flat.sort().values[-count:], rtol=0, atol=0)  # the largest |θ1 − θ0|
    assert set(masks) <= set(changes)


def test_selection_resets_every_change_and_the_head_copy(tiny, ids) -> None:
    pretrained = model_output(tiny, ids)
    _phase_one(tiny, modules_to_save=["head"])
    assert not torch.allclose(model_output(tiny, ids), pretrained)
    ltsft_select(tiny)
    torch.testing.assert_close(model_output(tiny, ids), pretrained, rtol=0, atol=0)  # θ0 again, head included
    assert all(torch.equal(p, q) for p, q in zip(tiny.head.peftkit["default"].module.parameters(), tiny.head.parameters(recurse=False)))


# --- phase 2: only the mask moves ----------------------------------------------------------------------------------

def test_phase_two_with_adamw_weight_decay_moves_nothing_outside_the_mask(tiny, ids) -> None:
    base = base_state(tiny)
    _phase_one(tiny, fraction=0.05, modules_to_save=["head"])
    ltsft_select(tiny)
    train_with_weight_decay(tiny, ids)
    assert_only_mask_moved(tiny, base)


def test_save_load_merge_reproduces_the_phase_two_outputs(tiny, ids, tmp_path: Path) -> None:
    fresh = copy.deepcopy(tiny)
    _phase_one(tiny, fraction=0.1, modules_to_save=["head"])
    ltsft_select(tiny)
    train_with_weight_decay(tiny, ids, steps=2)
    expected = model_output(tiny, ids)
    peftkit.save(tiny, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert tensors["attn.q.weight.indices"].dtype == torch.int32
    assert sum(v.numel() for k, v in tensors.items() if k.endswith(".values") and not k.startswith("head")) == round(
        0.1 * sum(p.numel() for n, p in tiny.named_parameters() if n.rpartition(".")[0] in TARGETS))
    peftkit.load(fresh, tmp_path)
    torch.testing.assert_close(model_output(fresh, ids), expected, rtol=0, atol=0)
    peftkit.merge(fresh)
    torch.testing.assert_close(model_output(fresh, ids), expected, rtol=1e-6, atol=1e-6)


def test_mixed_batch_with_lora_and_base_equals_rows_alone(tiny, ids) -> None:
    peftkit.attach(tiny, LTSFT(targets=TARGETS, fraction=0.2), "sparse")
    ltsft_select(tiny, "sparse")
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "ffn.2"]), "lora")
    randomize(tiny)
    rows = ["sparse", None, "lora", "sparse", "lora", None]
    assert_routed_matches_rows(tiny, ids, rows)
    assert_routed_grads_match_rows(tiny, ids, rows)


# --- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0, -0.5, 1.01])
def test_fraction_outside_unit_interval_is_rejected(fraction: float) -> None:
    with pytest.raises(ValidationError, match="fraction"):
        LTSFT(targets=TARGETS, fraction=fraction)


def test_selecting_twice_or_the_wrong_adapter_or_merged_is_a_named_error(tiny) -> None:
    assert_phase_change_refuses_bad_calls(_phase_one(tiny), ltsft_select, "ltsft", "already in phase 2")


def test_masks_for_missing_parameters_are_named_errors(tiny) -> None:
    _phase_one(tiny)
    with pytest.raises(MaskError, match="attn.v.bias"):  # v has no bias
        install_masks(tiny, "default", {"attn.v.bias": peftkit.Mask.whole()})


# --- learning ------------------------------------------------------------------------------------------------------


def test_ltsft_learns_bbc(tmp_path: Path) -> None:
    config = LTSFT(fraction=0.005, targets=["type:Linear"], exclude=["classifier"])  # phase 1: every encoder Linear
    result, _, _ = fit_bbc_in_two_phases(config, tmp_path)
    assert result.accuracy_after > 0.8  # and the controls in fit_bbc_in_two_phases
