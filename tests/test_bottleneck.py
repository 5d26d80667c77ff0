"""Bottleneck adapters: serial and parallel formulas, no-op init, routing, files, presets, errors, learning."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import Bottleneck, LoRA

from .bbc import LEARNS, fit_bbc
from .checks import assert_routed_grads_match_rows, assert_routed_matches_rows
from .conftest import randomize

ACTS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


def _adapter(delta: nn.Module, act: str, scale: float, h: torch.Tensor) -> torch.Tensor:
    """s · W_up f(W_down h + b_down) + s · b_up, written out by hand."""
    down, up = delta.down, delta.up
    return scale * (ACTS[act](h @ down.weight.T + down.bias) @ up.weight.T + up.bias)


@pytest.mark.parametrize(("act", "scale"), [("relu", 1.0), ("gelu", 4.0), ("tanh", 0.5), ("silu", 2.0)])
@pytest.mark.parametrize("host", ["linear", "conv1d"])
def test_serial_forward_matches_formula(act: str, scale: float, host: str) -> None:
    model = nn.Sequential(nn.Linear(12, 8) if host == "linear" else Conv1D(8, 12))  # Conv1D(out, in)
    base = copy.deepcopy(model)
    peftkit.attach(model, Bottleneck(bottleneck=5, activation=act, scale=scale, targets=["0"]))
    randomize(model)
    x = torch.randn(3, 4, 12)
    h = base(x)  # the host's output: the serial adapter reads it
    delta = model[0].peftkit["default"]
    torch.testing.assert_close(model(x), h + _adapter(delta, act, scale, h))
    assert not torch.allclose(model(x), h, atol=1e-3)


@pytest.mark.parametrize(("act", "scale"), [("relu", 1.0), ("silu", 4.0)])
@pytest.mark.parametrize("host", ["linear", "conv1d"])
def test_parallel_forward_matches_formula(act: str, scale: float, host: str) -> None:
    model = nn.Sequential(nn.Linear(12, 8) if host == "linear" else Conv1D(8, 12))
    base = copy.deepcopy(model)
    peftkit.attach(model, Bottleneck(bottleneck=5, activation=act, scale=scale, placement="parallel", targets=["0"]))
    randomize(model)
    x = torch.randn(3, 4, 12)
    delta = model[0].peftkit["default"]
    assert delta.down.weight.shape == (5, 12)  # the parallel adapter reads the host's input, not its output
    torch.testing.assert_close(model(x), base(x) + _adapter(delta, act, scale, x))


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_fresh_adapter_is_exact_noop(tiny, ids, placement: str) -> None:
    before = tiny(ids)
    peftkit.attach(tiny, Bottleneck(bottleneck=4, placement=placement, targets=["ffn.2", "attn.v"]))
    assert torch.equal(tiny(ids), before)
    delta = tiny.ffn[2].peftkit["default"]
    assert torch.count_nonzero(delta.down.weight) > 0  # only the up-projection starts at zero


def _mixed(tiny: nn.Module) -> nn.Module:
    peftkit.attach(tiny, Bottleneck(bottleneck=4, targets=["ffn.2", "attn.v"]), name="serial")
    peftkit.attach(tiny, Bottleneck(bottleneck=3, scale=4.0, placement="parallel", targets=["ffn.2", "attn.q"]),
                   name="parallel")
    peftkit.attach(tiny, LoRA(r=2, targets=["attn.q", "attn.v"]), name="lora")
    randomize(tiny)
    return tiny


def test_routed_mixed_batch_matches_rows(tiny, ids) -> None:
    rows = ["serial", "parallel", "lora", None, "parallel", "serial"]
    assert_routed_matches_rows(_mixed(tiny), ids, rows)


def test_routed_gradients_match_rows(tiny, ids) -> None:
    rows = ["parallel", "serial", None, "lora", "serial", "parallel"]
    grads = assert_routed_grads_match_rows(_mixed(tiny), ids, rows)
    for name in ("serial", "parallel", "lora"):
        assert any(f".{name}." in n for n in grads)  # every adapter's rows reached its parameters


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_save_load_roundtrip_is_exact(tiny, ids, tmp_path, placement: str) -> None:
    fresh = copy.deepcopy(tiny)
    config = Bottleneck(bottleneck=4, activation="gelu", scale=2.0, placement=placement, targets=["ffn.2", "attn.v"])
    peftkit.attach(tiny, config, name="bn")
    randomize(tiny)
    peftkit.save(tiny, tmp_path / "bn", name="bn")
    assert peftkit.load(fresh, tmp_path / "bn") == "bn"
    assert peftkit.adapters(fresh)["bn"] == config
    assert torch.equal(fresh(ids), tiny(ids))


def test_merge_is_a_named_error(tiny, ids) -> None:
    peftkit.attach(tiny, Bottleneck(bottleneck=4, targets=["ffn.2", "attn.v"]))
    randomize(tiny)
    weights = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        tiny.ffn[2].peftkit["default"].delta_weight()
    with pytest.raises(peftkit.MergeError, match=r"cannot merge adapter 'default' \(bottleneck\) into 'attn.v'"):
        peftkit.merge(tiny)
    for n, p in tiny.named_parameters():
        assert torch.equal(p, weights[n])
    with peftkit.routed(tiny, ["default", None, None, None, None, None]):  # not marked merged: routing still works
        tiny(ids)


def test_failed_merge_undoes_the_hosts_already_merged(tiny, ids, monkeypatch) -> None:
    """The general api.merge change: a delta that cannot merge leaves no host of its adapter merged."""
    peftkit.attach(tiny, LoRA(r=2, targets=["attn.q", "attn.v"]))
    randomize(tiny)
    weights = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    last = tiny.attn["v"].peftkit["default"]  # attach order: q is merged first, then v fails
    monkeypatch.setattr(last, "delta_weight", lambda: (_ for _ in ()).throw(NotImplementedError("no ΔW")))
    with pytest.raises(peftkit.MergeError, match=r"every host was put back.*no ΔW"):
        peftkit.merge(tiny)
    for n, p in tiny.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    assert not tiny.attn["q"].peftkit["default"].merged


def test_bottleneck_wider_than_hidden_names_module_and_sizes(tiny) -> None:
    with pytest.raises(ValueError, match=r"'ffn\.2'.*bottleneck 17 .*hidden size 16"):
        peftkit.attach(tiny, Bottleneck(bottleneck=17, targets=["ffn.2"]))
    assert peftkit.adapters(tiny) == {}  # nothing half-attached


@pytest.mark.parametrize(("field", "value", "listed"), [
    ("activation", "swish", "'relu', 'gelu', 'tanh' or 'silu'"),
    ("placement", "sequential", "'serial' or 'parallel'"),
    ("bottleneck", 0, "greater than 0"),
    ("scale", 0.0, "greater than 0"),
])
def test_bad_config_values_name_the_field(field: str, value: object, listed: str) -> None:
    with pytest.raises(ValidationError, match=rf"(?s){field}.*{listed}"):
        Bottleneck(targets=["x"], **{field: value})


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="'adapterdrop'.*houlsby, pfeiffer, parallel"):
        Bottleneck.preset("adapterdrop")


def _hosts(model: nn.Module, config: Bottleneck) -> list[str]:
    peftkit.attach(model, config)
    return sorted(peftkit.summary(model).per_module["default"])


def _bert() -> nn.Module:
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))


def _llama() -> nn.Module:
    return LlamaModel(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, intermediate_size=64))


def _gpt2() -> nn.Module:
    return GPT2Model(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2))


@pytest.mark.parametrize(("make", "houlsby", "pfeiffer"), [
    (_bert, ["encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense"], ["encoder.layer.{i}.output.dense"]),
    (_llama, ["layers.{i}.mlp.down_proj", "layers.{i}.self_attn.o_proj"], ["layers.{i}.mlp.down_proj"]),
    (_gpt2, ["h.{i}.attn.c_proj", "h.{i}.mlp.c_proj"], ["h.{i}.mlp.c_proj"]),
])
def test_presets_pick_sublayer_outputs_by_structure(make, houlsby: list[str], pfeiffer: list[str]) -> None:
    expand = lambda names: sorted(n.format(i=i) for i in range(2) for n in names)  # noqa: E731
    assert _hosts(make(), Bottleneck.preset("houlsby", bottleneck=8)) == expand(houlsby)
    assert _hosts(make(), Bottleneck.preset("pfeiffer", bottleneck=8)) == expand(pfeiffer)
    parallel = Bottleneck.preset("parallel", bottleneck=8)
    assert (parallel.placement, parallel.scale) == ("parallel", 4.0)
    assert _hosts(make(), parallel) == expand(pfeiffer)


def test_houlsby_on_bert_is_a_noop_then_changes_outputs() -> None:
    model = _bert().eval()
    ids = torch.randint(0, 100, (2, 7))
    before = model(ids).last_hidden_state
    peftkit.attach(model, Bottleneck.preset("houlsby", bottleneck=8))
    assert torch.equal(model(ids).last_hidden_state, before)
    randomize(model)
    assert not torch.allclose(model(ids).last_hidden_state, before, atol=1e-3)


def test_pfeiffer_serial_adapter_learns_bbc_topics() -> None:
    result, _, _ = fit_bbc(Bottleneck.preset("pfeiffer", bottleneck=64))
    assert result.accuracy_after > LEARNS


def test_scaled_parallel_adapter_learns_bbc_topics() -> None:
    result, _, _ = fit_bbc(Bottleneck.preset("parallel", bottleneck=64))
    assert result.accuracy_after > LEARNS
