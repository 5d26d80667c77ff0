"""AdapterFusion: the attention-over-adapters formula, the paper's init, frozen sources, routing, files,
named errors, and learning on BBC News from two briefly trained adapters."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

import peftkit
from peftkit import AdapterFusion, Bottleneck, LoRA
from peftkit.methods.additive.fusion import FusionError
from peftkit.models import load_minilm
from peftkit.train import TaskData

from .bbc import LEARNS, MARGIN, BBCRun, bbc_config, bbc_data, mean_tail, train_attached
from .checks import assert_routed_grads_match_rows, assert_routed_matches_rows, model_output
from .conftest import randomize


def _one_layer_with_adapters(names: tuple[str, ...] = ("a", "b", "c")) -> tuple[nn.Module, nn.Module]:
    """(model, bare copy): one Linear whose output is the model's output, with trained-looking serial adapters."""
    model = nn.Sequential(nn.Linear(12, 8))
    base = copy.deepcopy(model)
    for name in names:
        peftkit.attach(model, Bottleneck(bottleneck=4, activation="gelu", scale=2.0, targets=["0"]), name=name)
    randomize(model)
    return model, base


def _adapter_increment(model: nn.Module, name: str, h: torch.Tensor) -> torch.Tensor:
    """a_n(h) = s · W_up gelu(W_down h + b_down) + s · b_up, by hand."""
    delta = model[0].peftkit[name]
    return 2.0 * (F.gelu(h @ delta.down.weight.T + delta.down.bias) @ delta.up.weight.T + delta.up.bias)


def _alone(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    peftkit.activate(model, name)
    return model_output(model, x)


def test_fusion_matches_formula() -> None:
    """h + Σ_n softmax_n((Q h + b_Q)·(K a_n + b_K)) V a_n(h), by hand, with a non-uniform mix."""
    model, base = _one_layer_with_adapters()
    peftkit.attach(model, AdapterFusion(adapters=["a", "b", "c"]), name="fuse")
    randomize(model, "fuse", scale=0.5)
    fusion, x = model[0].peftkit["fuse"], torch.randn(3, 5, 12)
    h = base(x)
    z = torch.stack([_adapter_increment(model, n, h) for n in "abc"], dim=2)  # [3, 5, N=3, 8]
    q, k = fusion.query, fusion.key
    scores = torch.einsum("btd,btnd->btn", h @ q.weight.T + q.bias, z @ k.weight.T + k.bias)
    weights = torch.softmax(scores, dim=-1)
    expected = h + torch.einsum("btn,btnd->btd", weights, z @ fusion.value.weight.T)
    torch.testing.assert_close(model_output(model, x), expected)
    assert weights.std(dim=-1).mean() > 0.05  # the mix really depends on the scores


def test_paper_init_is_a_convex_mix_and_the_average_when_queries_are_zero() -> None:
    """V = I, so a fresh fusion outputs Σ s_n (h + a_n(h)); with Q h = 0 the weights are uniform: the average."""
    model, base = _one_layer_with_adapters()
    x = torch.randn(3, 5, 12)
    singles = torch.stack([_alone(model, n, x) for n in "abc"])  # h + a_n(h): each adapter's own output
    peftkit.attach(model, AdapterFusion(adapters=["a", "b", "c"]), name="fuse")
    fusion = model[0].peftkit["fuse"]
    assert torch.equal(fusion.value.weight, torch.eye(8))
    assert torch.count_nonzero(fusion.query.bias) == 0 and torch.count_nonzero(fusion.key.bias) == 0
    h = base(x)
    scores = ((h @ fusion.query.weight.T).unsqueeze(0) * ((singles - h) @ fusion.key.weight.T)).sum(-1)  # [N, 3, 5]
    mix = (torch.softmax(scores, dim=0).unsqueeze(-1) * singles).sum(0)
    fresh = _alone(model, "fuse", x)
    torch.testing.assert_close(fresh, mix)
    assert not torch.allclose(fresh, singles.mean(0), atol=1e-7)  # random Q, K: close to, not at, the average
    with torch.no_grad():
        fusion.query.weight.zero_()
    torch.testing.assert_close(_alone(model, "fuse", x), singles.mean(0))


def test_only_the_fusion_trains() -> None:
    model, _ = _one_layer_with_adapters(("a", "b"))
    peftkit.attach(model, AdapterFusion(adapters=["a", "b"]), name="fuse")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"0.peftkit.fuse.{p}" for p in ("query.weight", "query.bias", "key.weight", "key.bias",
                                                          "value.weight")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 12)).square().sum().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name


def test_routed_batch_mixes_fusion_single_adapters_and_base(tiny, ids) -> None:
    targets = ["ffn.2", "attn.v"]
    for name in ("a", "b"):
        peftkit.attach(tiny, Bottleneck(bottleneck=4, targets=targets), name=name)
    peftkit.attach(tiny, AdapterFusion(adapters=["a", "b"]), name="fuse")
    randomize(tiny)
    rows = ["fuse", "a", None, "fuse", "b", None]
    assert_routed_matches_rows(tiny, ids, rows)
    for name in ("a", "b"):  # unfreeze the sources so every row has a gradient to compare
        peftkit.set_trainable(tiny, name)
    grads = assert_routed_grads_match_rows(tiny, ids, rows)
    assert any(".fuse.query." in n for n in grads) and any(".a.down." in n for n in grads)


def test_save_load_needs_the_fused_adapters(tmp_path) -> None:
    model, base = _one_layer_with_adapters(("a", "b"))
    peftkit.attach(model, AdapterFusion(adapters=["a", "b"]), name="fuse")
    randomize(model, "fuse")
    x = torch.randn(4, 12)
    for name in ("a", "b", "fuse"):
        peftkit.save(model, tmp_path / name, name=name)
    with pytest.raises(peftkit.UnknownAdapterError, match="no adapter named 'a'"):
        peftkit.load(base, tmp_path / "fuse")
    assert peftkit.adapters(base) == {}
    for name in ("a", "b", "fuse"):
        peftkit.load(base, tmp_path / name)
    assert torch.equal(model_output(base, x), _alone(model, "fuse", x))
    assert peftkit.summary(base).per_adapter["fuse"] == 3 * 8 * 8 + 2 * 8  # Q, K, V and two biases only


def test_named_errors(tiny) -> None:
    with pytest.raises(ValidationError, match="at least 2"):
        AdapterFusion(adapters=["a"])
    with pytest.raises(ValidationError, match="distinct"):
        AdapterFusion(adapters=["a", "a"])
    with pytest.raises(ValidationError, match="leave targets and exclude unset"):
        AdapterFusion(adapters=["a", "b"], targets=["ffn.2"])
    peftkit.attach(tiny, Bottleneck(bottleneck=4, targets=["ffn.2"]), name="a")
    peftkit.attach(tiny, Bottleneck(bottleneck=4, targets=["ffn.0"]), name="wide")
    peftkit.attach(tiny, LoRA(r=2, targets=["ffn.2"]), name="lora")
    with pytest.raises(peftkit.UnknownAdapterError, match="no adapter named 'nope'"):
        peftkit.attach(tiny, AdapterFusion(adapters=["a", "nope"]), name="fuse")
    with pytest.raises(FusionError, match="fuses bottleneck adapters; 'lora' is a lora adapter"):
        peftkit.attach(tiny, AdapterFusion(adapters=["a", "lora"]), name="fuse")
    with pytest.raises(FusionError, match=r"'a' is on \{'ffn.2': 16\}, 'wide' on \{'ffn.0': 32\}"):
        peftkit.attach(tiny, AdapterFusion(adapters=["a", "wide"]), name="fuse")
    assert list(peftkit.adapters(tiny)) == ["a", "wide", "lora"]


def test_removed_source_and_merge_are_named_errors(tiny, ids) -> None:
    for name in ("a", "b"):
        peftkit.attach(tiny, Bottleneck(bottleneck=4, targets=["ffn.2"]), name=name)
    peftkit.attach(tiny, AdapterFusion(adapters=["a", "b"]), name="fuse")
    with pytest.raises(peftkit.MergeError, match="cannot merge adapter 'fuse' \\(adapter_fusion\\).*depends on the input"):
        peftkit.merge(tiny)
    peftkit.remove(tiny, "b")
    with pytest.raises(FusionError, match="adapter 'b' fused here was removed"):
        tiny(ids)


def test_fusion_of_two_bbc_adapters_beats_its_fixed_starting_mix() -> None:
    """Stage 1: two adapters, each trained briefly on half of the BBC subset; stage 2: fuse them with a fresh head.

    The control has the same budget from the same start: the fusion frozen at its initial weights (Q, K ~ N(0, 0.02²),
    V = I: within a hair of the adapters' plain average) with only the fresh head training. Fusion must beat it by
    MARGIN (0.05, 10 of 200 articles; see tests/bbc.py)."""
    data = bbc_data()
    model, _ = load_minilm(num_labels=5)
    halves = {"first": slice(0, 160), "second": slice(160, 320)}
    for name, rows in halves.items():
        adapter = Bottleneck.preset("pfeiffer", bottleneck=32, modules_to_save=["classifier"])
        peftkit.attach(model, adapter, name=name)
        half = TaskData({k: v[rows] for k, v in data.train.items()}, data.eval, data.labels)
        train_attached(model, bbc_config(adapter, lr=3e-3, epochs=1, adapter_name=name), half)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if ".peftkit." in n}
    fusion = AdapterFusion(adapters=list(halves), modules_to_save=["classifier"])
    peftkit.attach(model, fusion, name="fuse")
    start = {k: v.clone() for k, v in model.state_dict().items() if ".peftkit.fuse." in k}

    def stage_two() -> BBCRun:
        return train_attached(model, bbc_config(fusion, lr=3e-3, epochs=2, adapter_name="fuse"))

    peftkit.set_trainable(model, "fuse", False)
    model.classifier.peftkit["fuse"].requires_grad_(True)
    fixed = stage_two()
    model.load_state_dict(start, strict=False)
    peftkit.set_trainable(model, "fuse", True)
    result = stage_two()
    print(f"fusion: BBC accuracy {result.accuracy_before:.3f} -> {result.accuracy_after:.3f} in "
          f"{result.train_seconds:.1f}s; the starting mix frozen, head only: {fixed.accuracy_after:.3f}; last losses "
          f"{mean_tail(result.losses):.3f} vs {mean_tail(fixed.losses):.3f}")
    assert result.accuracy_after > LEARNS and result.accuracy_after >= fixed.accuracy_after + MARGIN
    assert mean_tail(result.losses) < mean_tail(fixed.losses)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in trained.items())  # stage 1 stays as trained
