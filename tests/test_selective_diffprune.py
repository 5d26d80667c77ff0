"""Diff pruning: the hard-concrete gate and its expected L0 by hand, δ = z ⊙ w in the forward pass, the exact
magnitude projection, files that hold the projection, fixed-mask training that moves nothing else, routing,
and learning on BBC News."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import DiffPruning, LoRA, SelectionError, diff_pruning_penalty, diff_pruning_project
from peftkit.methods.selective.diff_pruning import expected_l0, hard_concrete_mean, hard_concrete_sample

from .checks import assert_merge_roundtrip, assert_routed_grads_match_rows, assert_routed_matches_rows, model_output
from .conftest import randomize
from .selective_checks import (assert_only_mask_moved, assert_phase_change_refuses_bad_calls, base_state,
                                   fit_bbc_in_two_phases, train_with_weight_decay)

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
TARGETS = ["attn.q", "attn.v", "ffn.0"]


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# --- the gate ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("log_alpha", [-3.0, 0.0, 0.7, 4.0])
def test_expected_l0_and_the_eval_gate_follow_louizos_formulas(log_alpha: float) -> None:
    la = torch.tensor([log_alpha])
    assert expected_l0(la, BETA, GAMMA, ZETA).item() == pytest.approx(_sigmoid(log_alpha - BETA * math.log(0.1 / 1.1)))
    assert hard_concrete_mean(la, GAMMA, ZETA).item() == pytest.approx(min(1.0, max(0.0, _sigmoid(log_alpha) * 1.2 - 0.1)))


def test_a_gate_sample_is_the_stretched_clamped_concrete_of_a_uniform_draw() -> None:
    la = torch.linspace(-4, 4, 101)
    torch.manual_seed(3)
    u = torch.rand(101).clamp(1e-6, 1 - 1e-6)
    torch.manual_seed(3)
    z = hard_concrete_sample(la, BETA, GAMMA, ZETA)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + la) / BETA)
    torch.testing.assert_close(z, torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0, 1))
    assert bool((z == 0).any()) and bool((z == 1).any())  # hard zeros and ones, as the stretch promises


def test_the_share_of_non_zero_samples_matches_the_expected_l0() -> None:
    la = torch.full((200_000,), 0.5)
    share = (hard_concrete_sample(la, BETA, GAMMA, ZETA) > 0).float().mean().item()
    assert share == pytest.approx(expected_l0(la[:1], BETA, GAMMA, ZETA).item(), abs=0.005)


# --- the layer -----------------------------------------------------------------------------------------------------------

def _gated(tiny: nn.Module, **fields) -> nn.Module:
    peftkit.attach(tiny, DiffPruning(targets=TARGETS, **{"fraction": 0.1, **fields}))
    randomize(tiny)  # random w and log α
    return tiny


def _hand_model(tiny: nn.Module, change) -> nn.Module:
    """A bare copy of `tiny` with each targeted weight and bias moved by change(diff)."""
    plain = peftkit.unload(copy.deepcopy(tiny), merge_active=False)
    with torch.no_grad():
        for host in TARGETS:
            for param, diff in tiny.get_submodule(host).peftkit["default"].diffs():
                getattr(plain.get_submodule(host), param).add_(change(diff))
    return plain


def test_fresh_adapter_changes_nothing(tiny, ids) -> None:
    before = model_output(tiny, ids)
    peftkit.attach(tiny, DiffPruning(targets=TARGETS))
    tiny.train()
    torch.testing.assert_close(model_output(tiny, ids), before, rtol=0, atol=0)


def test_eval_output_uses_the_deterministic_gate(tiny, ids) -> None:
    _gated(tiny).eval()
    by_hand = _hand_model(tiny, lambda d: torch.clamp(torch.sigmoid(d.log_alpha) * 1.2 - 0.1, 0, 1) * d.values)
    torch.testing.assert_close(model_output(tiny, ids), model_output(by_hand, ids))


def test_training_output_uses_sampled_gates(tiny, ids) -> None:
    _gated(tiny, log_alpha_init=0.0).train()
    with torch.no_grad():
        for host in TARGETS:
            for _, diff in tiny.get_submodule(host).peftkit["default"].diffs():
                diff.log_alpha.fill_(50.0)  # s = 1 for every u: z = min(1, ζ) = 1, so δ = w exactly
    torch.testing.assert_close(model_output(tiny, ids), model_output(_hand_model(tiny, lambda d: d.values), ids))
    with torch.no_grad():
        for host in TARGETS:
            for _, diff in tiny.get_submodule(host).peftkit["default"].diffs():
                diff.log_alpha.fill_(0.0)
    assert not torch.equal(model_output(tiny, ids), model_output(tiny, ids))  # a fresh draw per pass


def test_penalty_is_lambda_times_the_expected_l0_and_trains_the_gates(tiny) -> None:
    _gated(tiny, l0_weight=0.01)
    diffs = [d for h in TARGETS for _, d in tiny.get_submodule(h).peftkit["default"].diffs()]
    by_hand = 0.01 * sum(_sigmoid(la - BETA * math.log(-GAMMA / ZETA)) for d in diffs for la in d.log_alpha.flatten().tolist())
    penalty = diff_pruning_penalty(tiny)
    assert penalty().item() == pytest.approx(by_hand, rel=1e-5)
    before = [d.log_alpha.detach().clone() for d in diffs]
    optimizer = torch.optim.SGD(peftkit.adapter_parameters(tiny, "default"), lr=10.0)
    penalty().backward()
    optimizer.step()
    assert all(bool((d.log_alpha < b).all()) for d, b in zip(diffs, before))  # every gate pushed toward closed


# --- projection, files, merge --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
def test_projection_keeps_exactly_the_largest_eval_diff_entries(tiny, ids, fraction: float) -> None:
    _gated(tiny, fraction=fraction).eval()
    eval_diff = {f"{h}.{p}": (torch.clamp(torch.sigmoid(d.log_alpha) * 1.2 - 0.1, 0, 1) * d.values).detach()
                 for h in TARGETS for p, d in tiny.get_submodule(h).peftkit["default"].diffs()}
    flat = torch.cat([v.flatten() for v in eval_diff.values()])
    count = max(1, round(fraction * flat.numel()))
    threshold = flat.abs().sort().values[-count]
    masks = diff_pruning_project(tiny)
    kept = {k: torch.zeros_like(v).flatten().index_fill_(0, masks[k].indices, 1.0).view(v.shape) if masks[k].indices is not None
            else torch.ones_like(v) for k, v in eval_diff.items()}
    assert sum(int(m.sum()) for m in kept.values()) == count
    assert all(bool((eval_diff[k].abs()[m.bool()] >= threshold).all()) for k, m in kept.items())
    by_hand = _hand_model(tiny, lambda d: 0)  # bare base; add ΔW = kept ⊙ δ by hand
    with torch.no_grad():
        for key, value in eval_diff.items():
            host, _, param = key.rpartition(".")
            getattr(by_hand.get_submodule(host), param).add_(value * kept[key])
    torch.testing.assert_close(model_output(tiny, ids), model_output(by_hand, ids))
    assert_merge_roundtrip(tiny, ids, "attn.q.weight")


def test_saving_a_gated_adapter_saves_its_projection(tiny, ids, tmp_path: Path) -> None:
    fresh = copy.deepcopy(tiny)
    _gated(tiny, modules_to_save=["head"]).eval()
    peftkit.save(tiny, tmp_path / "gated")
    assert tiny.attn.q.peftkit["default"].gated  # saving leaves the live adapter gated
    diff_pruning_project(tiny)
    projected = model_output(tiny, ids)
    peftkit.save(tiny, tmp_path / "projected")
    gated_file, projected_file = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("gated", "projected"))
    assert gated_file.keys() == projected_file.keys()
    assert all(torch.equal(gated_file[k], projected_file[k]) for k in gated_file)
    assert gated_file["attn.q.weight.indices"].dtype == torch.int32 and not any("log_alpha" in k for k in gated_file)
    peftkit.load(fresh, tmp_path / "gated")
    torch.testing.assert_close(model_output(fresh, ids), projected, rtol=0, atol=0)
    peftkit.merge(fresh)
    torch.testing.assert_close(model_output(fresh, ids), projected, rtol=1e-6, atol=1e-6)


def test_fixed_mask_training_with_adamw_weight_decay_moves_nothing_outside_the_mask(tiny, ids) -> None:
    base = base_state(tiny)
    _gated(tiny, fraction=0.05, modules_to_save=["head"])
    diff_pruning_project(tiny)
    train_with_weight_decay(tiny, ids)
    assert_only_mask_moved(tiny, base)


@pytest.mark.parametrize("project", [False, True])
def test_mixed_batch_with_lora_and_base_equals_rows_alone(tiny, ids, project: bool) -> None:
    _gated(tiny)
    if project:
        diff_pruning_project(tiny)
    peftkit.attach(tiny, LoRA(r=2, targets=["attn.k", "ffn.2"]), "lora")
    randomize(tiny, "lora")
    tiny.eval()  # a fixed gate: the same δ for a row alone and in the batch
    rows = ["default", "lora", None, "default", "lora", "default"]
    assert_routed_matches_rows(tiny, ids, rows)
    assert_routed_grads_match_rows(tiny, ids, rows)


# --- bad input -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("fraction", 0), ("fraction", 2.0), ("gamma", 0.0), ("zeta", 1.0),
                                          ("beta", 0.0), ("l0_weight", -1.0)])
def test_bad_fields_are_rejected(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        DiffPruning(targets=TARGETS, **{field: value})


def test_penalty_or_projection_after_projection_or_on_another_method_are_named_errors(tiny) -> None:
    assert_phase_change_refuses_bad_calls(_gated(tiny), diff_pruning_project, "diff_pruning", "already projected")
    with pytest.raises(SelectionError, match="already projected"):
        diff_pruning_penalty(tiny, "default")
    with pytest.raises(SelectionError, match="not diff_pruning"):
        diff_pruning_penalty(tiny, "lora")


# --- learning ----------------------------------------------------------------------------------------------------------------

def test_diff_pruning_learns_bbc(tmp_path: Path) -> None:
    config = DiffPruning(fraction=0.005, targets=["type:Linear"], exclude=["classifier"])
    # the dense phase adds the L0 penalty to the loss (the method's own training step)
    result, _, _ = fit_bbc_in_two_phases(config, tmp_path, sparse_epochs=1)
    assert result.accuracy_after > 0.8
