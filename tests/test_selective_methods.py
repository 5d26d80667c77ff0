"""Each selective method picks exactly its parameters: BitFit, LayerNorm tuning, last-k, PaFi, FishMask,
Fish-Dip (re-selection keeps every change and moves the optimizer state), Child-Tuning_D and _F."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import (BitFit, ChildTuningD, ChildTuningF, FishDip, FishDipSchedule, FishMask, LastK, LayerNormTuning,
                     PaFi, SelectionError, TargetError)
from peftkit.methods.selective.fishmask import reselect
from peftkit.methods.selective.selection import fisher_scores, top_fraction

from .checks import assert_routed_matches_rows
from .conftest import randomize

LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _bert(layers: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=2, n_positions=32)).eval()


# --- rule-based --------------------------------------------------------------------------------------------------

def test_bitfit_trains_exactly_the_targets_biases_as_dense_blocks(tmp_path: Path) -> None:
    model = _bert()
    peftkit.attach(model, BitFit(targets=["type:Linear", "type:LayerNorm"], exclude=["classifier"],
                                 modules_to_save=["classifier"]))
    biases = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm)) and "classifier" not in n}
    trainable = _trainable(model)
    assert {n.split(".peftkit.")[0] for n in trainable if "classifier" not in n} == biases
    assert all(n.endswith("bias.values") for n in trainable if "classifier" not in n)
    peftkit.save(model, tmp_path)
    assert not any(k.endswith("indices") for k in load_file(str(tmp_path / "adapter.safetensors")))


def test_bitfit_on_a_module_without_bias_is_a_named_error(tiny) -> None:
    with pytest.raises(ValueError, match=r"bitfit cannot adapt module 'attn.v'.*\['bias'\]"):
        peftkit.attach(tiny, BitFit(targets=["q", "v"]))
    assert peftkit.adapters(tiny) == {}


def test_layernorm_tuning_trains_every_layernorm_by_default() -> None:
    model = _bert()
    in_norms = sum(p.numel() for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters())
    peftkit.attach(model, LayerNormTuning())
    assert sum(p.numel() for p in _trainable(model).values()) == in_norms
    with pytest.raises(TargetError, match="cannot adapt"):
        peftkit.attach(model, LayerNormTuning(targets=["query"]), "wrong")


@pytest.mark.parametrize(("make", "blocks"), [(_bert, "bert.encoder.layer"), (_gpt2, "transformer.h")])
def test_lastk_trains_the_top_k_blocks_whole(make, blocks: str) -> None:
    model, top = make(), (f"{blocks}.1.", f"{blocks}.2.")
    expected = {n for n, m in model.named_modules() if n.startswith(top) and next(m.parameters(recurse=False), None) is not None}
    in_blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith(top))
    peftkit.attach(model, LastK(k=2))
    assert set(peftkit.api.get_registry(model).hosts["default"]) == expected
    assert sum(p.numel() for p in _trainable(model).values()) == in_blocks


def test_lastk_filters_by_targets_and_names_bad_settings(tiny) -> None:
    model = _bert()
    peftkit.attach(model, LastK(k=1, targets=r".*attention.*", exclude=["type:LayerNorm"]))
    hosts = peftkit.api.get_registry(model).hosts["default"]
    assert hosts == [f"bert.encoder.layer.2.attention.{n}" for n in ("self.query", "self.key", "self.value", "output.dense")]
    with pytest.raises(TargetError, match="holds only 3 blocks"):
        peftkit.attach(model, LastK(k=4), "too_many")
    with pytest.raises(TargetError, match="not a module"):
        peftkit.attach(model, LastK(k=1, blocks="bert.encoder.layers"), "typo")
    with pytest.raises(TargetError, match="no ModuleList of blocks"):
        peftkit.attach(tiny, LastK(k=1))
    with pytest.raises(ValueError, match="k"):
        LastK(k=0)


def test_pafi_trains_the_smallest_magnitudes_exactly(tiny) -> None:
    targets = ["q", "k", "v", "ffn.0", "ffn.2"]
    peftkit.attach(tiny, PaFi(targets=targets, fraction=0.1))
    chosen, rest = [], []
    for name in targets:
        host = tiny.get_submodule(name if name.startswith("ffn") else f"attn.{name}")
        inside = torch.zeros(host.weight.numel(), dtype=torch.bool)
        inside[host.peftkit["default"].weight.indices] = True
        chosen.append(host.weight.flatten()[inside].abs())
        rest.append(host.weight.flatten()[~inside].abs())
    chosen, rest = torch.cat(chosen), torch.cat(rest)
    assert chosen.numel() == round(0.1 * (chosen.numel() + rest.numel())) and chosen.max() <= rest.min()


# --- Fisher-based ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "per_example"), [(FishMask(targets=["q", "ffn.0"], fraction=0.1), True),
                                                     (ChildTuningD(targets=["q", "ffn.0"], fraction=0.1), False)])
def test_fisher_methods_select_the_top_scores(tiny, ids, config, per_example: bool) -> None:
    batches = [(ids[:4], LABELS[:4]), (ids[4:], LABELS[4:])]
    peftkit.attach(tiny, config)
    expected = top_fraction(fisher_scores(tiny, "default", batches, per_example=per_example), 0.1)
    masks = peftkit.select(tiny, "default", batches)
    assert all(torch.equal(masks[k].indices, expected[k].indices) for k in expected)
    delta = tiny.attn.q.peftkit["default"]
    assert torch.equal(delta.weight.indices, expected["attn.q.weight"].indices.sort().values)


def _fishdip(tiny: nn.Module, ids: torch.Tensor, fraction: float = 0.2) -> torch.optim.Optimizer:
    peftkit.attach(tiny, FishDip(targets=["q", "k", "ffn.0", "ffn.2"], fraction=fraction, samples=3, every=2,
                                 modules_to_save=["head"]))
    peftkit.select(tiny, "default", [(ids, LABELS)])
    optimizer = torch.optim.AdamW(peftkit.adapter_parameters(tiny, "default"), lr=0.05, weight_decay=0.1)
    for _ in range(3):
        F.cross_entropy(tiny(ids), LABELS).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_fishdip_reselection_keeps_every_change_and_moves_optimizer_state(tiny, ids) -> None:
    optimizer = _fishdip(tiny, ids)
    before = tiny(ids)
    diff = tiny.ffn[0].peftkit["default"].weight
    old_indices, old_values = diff.indices.clone(), diff.values.detach().clone()
    old_state = optimizer.state[diff.values]["exp_avg"].clone()
    new_indices = torch.cat([old_indices[::2], torch.tensor([i for i in range(512) if i not in old_indices.tolist()][:5])])
    reselect(tiny, "default", {"ffn.0.weight": peftkit.Mask.elements(new_indices)}, optimizer)
    torch.testing.assert_close(tiny(ids), before, rtol=0, atol=1e-6)  # the model did not change
    moved = tiny.ffn[0].peftkit["default"].weight
    stay = torch.isin(moved.indices, old_indices)
    assert torch.equal(moved.values.detach()[stay], old_values[::2]) and not moved.values[~stay].any()
    assert torch.equal(optimizer.state[moved.values]["exp_avg"][stay], old_state[::2])
    assert not optimizer.state[moved.values]["exp_avg"][~stay].any()
    assert torch.equal(moved.frozen_indices, old_indices[1::2]) and torch.equal(moved.frozen_values, old_values[1::2])
    assert any(p is moved.values for g in optimizer.param_groups for p in g["params"])
    assert not any(p is diff.values for g in optimizer.param_groups for p in g["params"])
    query = tiny.attn.q.peftkit["default"].weight  # absent from the new masks: its changes all freeze
    assert query.values.numel() == 0 and query.frozen_values.numel() == query.size() > 0


def test_fishdip_schedule_trains_nothing_outside_the_union_of_its_masks(tiny, ids, tmp_path: Path) -> None:
    fresh = copy.deepcopy(tiny)
    base = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    optimizer = _fishdip(tiny, ids, fraction=0.05)
    schedule = FishDipSchedule(tiny, "default", [(ids, LABELS)])
    schedule.bind(optimizer)
    for step in range(6):
        F.cross_entropy(tiny(ids), LABELS).backward()
        optimizer.step()
        schedule(step)
        optimizer.zero_grad()
    assert schedule.reselections == 3
    diff = tiny.ffn[0].peftkit["default"].weight
    changed = diff.flat_change()[0]
    assert diff.frozen_indices.numel() > 0 and changed.numel() > diff.indices.numel()
    expected = tiny(ids)
    peftkit.save(tiny, tmp_path)  # the file holds every entry ever changed
    peftkit.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids), expected, rtol=0, atol=1e-6)
    peftkit.merge(tiny)
    weight = tiny.ffn[0].weight.flatten()
    outside = torch.ones_like(weight, dtype=torch.bool).index_fill(0, changed, False)
    assert torch.equal(weight[outside], base["ffn.0.weight"].flatten()[outside])


def test_fishdip_schedule_needs_the_optimizer_and_a_fishdip_adapter(tiny, ids) -> None:
    peftkit.attach(tiny, FishDip(targets=["q"], every=1, samples=2))
    peftkit.select(tiny, "default", [(ids, LABELS)])
    with pytest.raises(SelectionError, match="pass the optimizer"):
        FishDipSchedule(tiny, "default", [(ids, LABELS)])(0)
    with pytest.raises(SelectionError, match="does not hold"):
        FishDipSchedule(tiny, "default", [(ids, LABELS)], optimizer=torch.optim.SGD([nn.Parameter(torch.ones(1))]))(0)
    peftkit.attach(tiny, FishMask(targets=["k"]), "fixed")
    with pytest.raises(SelectionError, match="not fishdip"):
        FishDipSchedule(tiny, "fixed", [(ids, LABELS)])


def test_child_tuning_f_masks_each_gradient_with_bernoulli_p_over_p(tiny, ids) -> None:
    peftkit.attach(tiny, ChildTuningF(targets=["ffn.0", "ffn.2"], p=0.25))
    randomize(tiny)
    diff = tiny.ffn[0].peftkit["default"].weight
    assert diff.is_dense and diff.values.shape == tiny.ffn[0].weight.shape  # task-free: any entry may move
    delta = tiny.ffn[0].peftkit["default"]
    delta.p = 1.0  # keeps every entry: the plain gradient
    F.cross_entropy(tiny(ids), LABELS).backward()
    full, diff.values.grad = diff.values.grad, None
    delta.p = 0.25
    F.cross_entropy(tiny(ids), LABELS).backward()
    grad, kept = diff.values.grad, diff.values.grad != 0
    torch.testing.assert_close(grad[kept], full[kept] / 0.25)
    assert 0.15 < kept.float().mean() < 0.35
    diff.values.grad = None
    F.cross_entropy(tiny(ids), LABELS).backward()
    assert not torch.equal(diff.values.grad != 0, kept)  # a fresh child every backward pass


def test_selective_adapters_route_per_row_with_each_other(tiny, ids) -> None:
    peftkit.attach(tiny, ChildTuningF(targets=["q", "ffn.0"]), "child")
    peftkit.attach(tiny, FishMask(targets=["k", "ffn.2"], fraction=0.2), "fish")
    peftkit.select(tiny, "fish", [(ids, LABELS)])
    randomize(tiny)
    assert_routed_matches_rows(tiny, ids, ["fish", "child", None, "child", "fish", None])


def test_layernorm_tuning_on_rmsnorms_equals_the_changed_weights() -> None:
    """Llama's RMSNorms (transformers' class) and torch's nn.RMSNorm: h = (w0 + Δw) ⊙ x / rms(x); merging equals it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    plain = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8, eps=1e-5))
    for model, targets, x in ((llama, ["input_layernorm", "post_attention_layernorm", "norm"], torch.randint(0, 40, (2, 5))),
                              (plain, ["1"], torch.randn(3, 8))):
        reference = copy.deepcopy(model)
        peftkit.attach(model, LayerNormTuning(targets=targets))
        changed = 0
        with torch.no_grad():
            for name, delta in ((n, m.peftkit["default"]) for n, m in model.named_modules() if hasattr(m, "peftkit")):
                delta.weight.values.normal_()
                reference.get_submodule(name).weight += delta.weight.values
                changed += 1
        assert changed == (5 if model is llama else 1)
        run = (lambda m: m(x).logits) if model is llama else (lambda m: m(x))
        torch.testing.assert_close(run(model), run(reference), rtol=1e-5, atol=1e-5)
        peftkit.merge(model)
        torch.testing.assert_close(run(model), run(reference), rtol=1e-5, atol=1e-5)
