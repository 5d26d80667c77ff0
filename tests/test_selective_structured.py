"""Structured masks: heads and FFN units found in BERT and Llama (grouped-query), exact unit counts chosen by
hand-summed scores, dense blocks in files, nothing outside the blocks moves, merge, routing, learning on BBC."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit import LoRA, NoDataError, StructuredMask, StructureError, select_units
from peftkit.methods.selective.selection import fisher_scores
from peftkit.methods.selective.structured import Member, unit_groups

from .checks import assert_merge_roundtrip, assert_routed_grads_match_rows, assert_routed_matches_rows, model_output
from .selective_checks import assert_only_mask_moved, base_state, saved_kib, trainable_share, train_with_weight_decay

HEADS, HEAD_SIZE, FFN = 4, 4, 24


class Logits(nn.Module):
    """A transformers model called on token ids alone, returning its logits (what the routing checks expect)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def _bert() -> Logits:
    config = BertConfig(vocab_size=50, hidden_size=HEADS * HEAD_SIZE, num_hidden_layers=2, num_attention_heads=HEADS,
                        intermediate_size=FFN, max_position_embeddings=16, num_labels=3)
    return Logits(BertForSequenceClassification(config).eval())


def _llama() -> Logits:
    config = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=4, intermediate_size=FFN, max_position_embeddings=16)
    return Logits(LlamaForCausalLM(config).eval())


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 50, (6, 5))


def _layer(i: int) -> str:
    return f"model.bert.encoder.layer.{i}"


# --- finding the units ---------------------------------------------------------------------------------------------

def test_bert_heads_are_qkv_rows_and_output_columns_and_ffn_units_are_rows_and_columns() -> None:
    groups = unit_groups(_bert(), ["heads", "ffn"])
    heads, ffn = groups[:2], groups[2:]
    assert [g.units for g in heads] == [HEADS, HEADS] and [g.units for g in ffn] == [FFN, FFN]
    attention = f"{_layer(0)}.attention"
    assert heads[0].members == (Member(f"{attention}.self.query", 0, HEAD_SIZE), Member(f"{attention}.self.key", 0, HEAD_SIZE),
                                Member(f"{attention}.self.value", 0, HEAD_SIZE), Member(f"{attention}.output.dense", 1, HEAD_SIZE))
    assert ffn[1].members == (Member(f"{_layer(1)}.intermediate.dense", 0, 1), Member(f"{_layer(1)}.output.dense", 1, 1))


def test_llama_units_are_key_value_groups_with_their_query_heads() -> None:
    heads, _, ffn, _ = unit_groups(_llama(), ["heads", "ffn"])
    attn, mlp = "model.model.layers.0.self_attn", "model.model.layers.0.mlp"
    assert heads.units == 2  # two key/value heads, each read by two of the four query heads
    assert heads.members == (Member(f"{attn}.q_proj", 0, 8), Member(f"{attn}.k_proj", 0, 4),
                             Member(f"{attn}.v_proj", 0, 4), Member(f"{attn}.o_proj", 1, 8))
    assert ffn.units == FFN and ffn.members == (Member(f"{mlp}.gate_proj", 0, 1), Member(f"{mlp}.up_proj", 0, 1),
                                                Member(f"{mlp}.down_proj", 1, 1))


def test_models_without_known_heads_and_targets_that_split_a_unit_are_named_errors() -> None:
    gpt2 = GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=4, n_positions=16))
    with pytest.raises(StructureError, match="found no attention heads.*GPT2Model"):
        peftkit.attach(gpt2, StructuredMask(units=["heads"]))
    with pytest.raises(StructureError, match="split a unit.*output.dense"):
        peftkit.attach(_bert(), StructuredMask(targets=["query", "key", "value"]))
    with pytest.raises(StructureError, match="no complete heads"):
        peftkit.attach(_bert(), StructuredMask(targets=["classifier"], units=["heads"]))
    for units in ([], ["heads", "heads"], ["rows"]):
        with pytest.raises(ValidationError, match="units"):
            StructuredMask(units=units)
    for fraction in (0, 1.5, -0.2):
        with pytest.raises(ValidationError, match="fraction"):
            StructuredMask(fraction=fraction)


# --- choosing units --------------------------------------------------------------------------------------------------

def _hand_head_scores(model: nn.Module, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per head, over both layers: Σ over its q/k/v rows (weights and biases) and its output columns."""
    out = []
    for layer in range(2):
        att = f"{_layer(layer)}.attention"
        for h in range(HEADS):
            rows = slice(h * HEAD_SIZE, (h + 1) * HEAD_SIZE)
            total = sum(scores[f"{att}.self.{p}.weight"][rows].sum() + scores[f"{att}.self.{p}.bias"][rows].sum()
                        for p in ("query", "key", "value"))
            out.append(total + scores[f"{att}.output.dense.weight"][:, rows].sum())
    return torch.stack(out)


def _chosen_heads(model: nn.Module) -> list[int]:
    """Heads (numbered across layers) whose query rows the adapter trains."""
    chosen = []
    for layer in range(2):
        entries = model.get_submodule(f"{_layer(layer)}.attention.self.query").peftkit["default"].weight.flat_change()[0]
        chosen += sorted({layer * HEADS + int(e) // (16 * HEAD_SIZE) for e in entries})  # 16 inputs per row
    return chosen


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_magnitude_picks_exactly_the_fraction_of_heads_with_the_largest_summed_magnitude(fraction: float) -> None:
    model = _bert()
    peftkit.attach(model, StructuredMask(fraction=fraction, units=["heads"], score="magnitude"))
    select_units(model, "default")
    by_hand = _hand_head_scores(model, {n: p.detach().abs() for n, p in model.named_parameters()})
    count = round(fraction * 2 * HEADS)
    assert _chosen_heads(model) == sorted(by_hand.topk(count).indices.tolist())
    per_head = 3 * (HEAD_SIZE * 16 + HEAD_SIZE) + 16 * HEAD_SIZE  # q/k/v rows with biases + output columns
    assert peftkit.summary(model).trainable == count * per_head  # the head blocks and nothing else


def test_fisher_scores_of_a_unit_are_its_parameters_fisher_summed(ids) -> None:
    model = _bert()
    peftkit.attach(model, StructuredMask(fraction=0.25, units=["heads", "ffn"]))
    batches = [(ids[:3], torch.tensor([0, 1, 2])), (ids[3:], torch.tensor([2, 2, 1]))]
    scores = fisher_scores(model, "default", batches)
    select_units(model, "default", batches)
    assert _chosen_heads(model) == sorted(_hand_head_scores(model, scores).topk(2).indices.tolist())
    ffn = torch.cat([scores[f"{_layer(i)}.intermediate.dense.weight"].sum(1) + scores[f"{_layer(i)}.intermediate.dense.bias"]
                     + scores[f"{_layer(i)}.output.dense.weight"].sum(0) for i in range(2)])
    expected = ffn.topk(round(0.25 * 2 * FFN)).indices.sort().values
    chosen = torch.cat([model.get_submodule(f"{_layer(i)}.output.dense").peftkit["default"].weight.indices + i * FFN
                        for i in range(2)])
    assert torch.equal(chosen, expected)


def test_fisher_without_batches_is_a_named_error(ids) -> None:
    model = _bert()
    peftkit.attach(model, StructuredMask())
    with pytest.raises(NoDataError, match="need training batches"):
        select_units(model, "default")
    with pytest.raises(NoDataError, match="at least one example"):
        select_units(model, "default", [])


# --- training, files, merge, routing ---------------------------------------------------------------------------------

def _selected(model: nn.Module, name: str = "default", **fields) -> nn.Module:
    peftkit.attach(model, StructuredMask(score="magnitude", **{"fraction": 0.25, **fields}), name)
    select_units(model, name)
    return model


@pytest.mark.parametrize("build", [_bert, _llama])
def test_adamw_with_weight_decay_moves_nothing_outside_the_blocks(build, ids) -> None:
    model = build()
    base = base_state(model)
    _selected(model)
    train_with_weight_decay(model, ids)
    assert_only_mask_moved(model, base)


def test_save_load_merge_reproduces_outputs_from_dense_blocks(ids, tmp_path: Path) -> None:
    model = _selected(_bert(), modules_to_save=["model.classifier"])
    fresh = copy.deepcopy(model)
    peftkit.remove(fresh, "default")
    train_with_weight_decay(model, ids, steps=2)
    expected = model_output(model, ids)
    peftkit.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    query, output = f"{_layer(0)}.attention.self.query", f"{_layer(0)}.attention.output.dense"
    heads = len(tensors[f"{query}.weight.indices"]) // HEAD_SIZE
    assert tensors[f"{query}.weight.values"].shape == (heads * HEAD_SIZE, 16)  # whole rows: a dense block
    assert tensors[f"{output}.weight.values"].shape == (16, heads * HEAD_SIZE) and int(tensors[f"{output}.weight.slice_dim"]) == 1
    peftkit.load(fresh, tmp_path)
    torch.testing.assert_close(model_output(fresh, ids), expected, rtol=0, atol=0)
    peftkit.merge(fresh)
    torch.testing.assert_close(model_output(fresh, ids), expected, rtol=1e-5, atol=1e-5)


def test_llama_merge_round_trip(ids) -> None:
    model = _selected(_llama())
    train_with_weight_decay(model, ids, steps=1)
    assert_merge_roundtrip(model, ids, "model.model.layers.0.mlp.down_proj.weight")


def test_mixed_batch_with_lora_and_base_equals_rows_alone(ids) -> None:
    model = _selected(_bert(), "blocks")
    peftkit.attach(model, LoRA(r=2, targets=["query", "value"]), "lora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".peftkit." in n:
                p.normal_(0, 0.3)
    rows = ["blocks", "lora", None, "blocks", None, "lora"]
    assert_routed_matches_rows(model, ids, rows)
    assert_routed_grads_match_rows(model, ids, rows)


# --- learning ----------------------------------------------------------------------------------------------------------

def test_structured_masks_learn_bbc(tmp_path: Path) -> None:
    from .bbc import fit_bbc

    # the units are chosen from the Fisher on the run's first training batches (the method's own training step)
    result, model, _ = fit_bbc(StructuredMask(fraction=0.05), lr=1e-3)
    share, kib = trainable_share(model), saved_kib(model, tmp_path / "structured")
    print(f"structured: accuracy {result.accuracy_after:.3f}, trains {100 * share:.3f}% of the base, saved {kib:.0f} KiB")
    assert result.accuracy_after > 0.8  # and fit_bbc's controls: the head alone, the masks switched off
