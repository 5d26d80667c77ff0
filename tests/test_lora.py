"""LoRA numerics: the written formula, zero init, merge/unmerge, scalings, hosts, PiSSA."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import LoRA

from .conftest import randomize


def _wrap(module: nn.Module) -> nn.Sequential:
    return nn.Sequential(module)


@pytest.mark.parametrize(("rslora", "scale"), [(False, 6 / 4), (True, 6 / 2)])
def test_linear_forward_matches_formula(rslora: bool, scale: float) -> None:
    model = _wrap(nn.Linear(12, 7))
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.attach(model, LoRA(r=4, alpha=6, rslora=rslora, targets=["0"]))
    randomize(model)
    a, b = model[0].peftkit["default"].lora_A, model[0].peftkit["default"].lora_B
    x = torch.randn(4, 3, 12)
    expected = x @ w0.T + b0 + scale * (x @ a.T @ b.T)  # W0 x + s·B A x
    torch.testing.assert_close(model(x), expected)
    assert not torch.allclose(model(x), x @ w0.T + b0, atol=1e-3)


def test_conv1d_host_uses_transposed_weight() -> None:
    model = _wrap(Conv1D(7, 12))  # GPT-2 layout: weight [in=12, out=7]
    randomize_base = model[0].weight.detach().clone()
    peftkit.attach(model, LoRA(r=3, alpha=3, targets=["0"]))
    randomize(model)
    a, b = model[0].peftkit["default"].lora_A, model[0].peftkit["default"].lora_B
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x), x @ randomize_base + model[0].bias + x @ a.T @ b.T)


def test_conv2d_forward_and_merge() -> None:
    model = _wrap(nn.Conv2d(3, 8, kernel_size=3, padding=1, stride=2))
    base = copy.deepcopy(model)
    peftkit.attach(model, LoRA(r=2, alpha=4, targets=["0"]))
    randomize(model)
    d = model[0].peftkit["default"]
    x = torch.randn(2, 3, 9, 9)
    expected = base(x) + 2.0 * F.conv2d(F.conv2d(x, d.lora_A, stride=2, padding=1), d.lora_B)
    torch.testing.assert_close(model(x), expected)
    unmerged = model(x)
    peftkit.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


def test_embedding_forward_and_zero_init() -> None:
    model = _wrap(nn.Embedding(20, 6, padding_idx=0))
    ids = torch.randint(0, 20, (3, 4))
    before = model(ids).detach().clone()
    peftkit.attach(model, LoRA(r=2, alpha=2, targets=["0"]))
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)  # zero-A init: exact no-op
    randomize(model)
    d = model[0].peftkit["default"]
    torch.testing.assert_close(model(ids), before + d.lora_A.T[ids] @ d.lora_B.T)


@pytest.mark.parametrize("init", ["zero", "gaussian"])
def test_fresh_adapter_is_exact_noop(tiny, ids, init: str) -> None:
    before = tiny(ids)
    peftkit.attach(tiny, LoRA(r=4, targets="all-linear", init=init, rank_pattern={"head": 2}))
    assert torch.equal(tiny(ids), before)


def test_merge_unmerge_roundtrip(tiny, ids) -> None:
    w0 = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    peftkit.attach(tiny, LoRA(r=4, alpha=8, targets="all-linear", rank_pattern={"head": 2}))
    randomize(tiny)
    unmerged = tiny(ids)
    peftkit.merge(tiny)
    torch.testing.assert_close(tiny(ids), unmerged, rtol=1e-5, atol=1e-5)
    changed = [n for n, p in tiny.named_parameters() if n in w0 and not torch.equal(p, w0[n])]
    assert changed and all(n.endswith("weight") for n in changed)
    peftkit.unmerge(tiny)
    for n, p in tiny.named_parameters():
        if n in w0:
            torch.testing.assert_close(p, w0[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny(ids), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_twice_and_unmerge_unmerged_are_errors(tiny) -> None:
    peftkit.attach(tiny, LoRA(targets=["q"]))
    peftkit.merge(tiny)
    with pytest.raises(ValueError, match="already merged"):
        peftkit.merge(tiny)
    peftkit.unmerge(tiny)
    with pytest.raises(ValueError, match="not merged"):
        peftkit.unmerge(tiny, "default")


def test_unload_returns_plain_merged_model(tiny, ids) -> None:
    peftkit.attach(tiny, LoRA(r=4, targets="all-linear", rank_pattern={"head": 2}))
    randomize(tiny)
    adapted = tiny(ids)
    plain = peftkit.unload(tiny)
    assert not any(".peftkit." in n for n, _ in plain.named_parameters())
    assert not any(m._forward_hooks for m in plain.modules())
    torch.testing.assert_close(plain(ids), adapted, rtol=1e-5, atol=1e-5)


def test_shared_input_fusion_equals_separate_projections(tiny, ids) -> None:
    peftkit.attach(tiny, LoRA(r=3, targets=["q", "k", "v"]))
    randomize(tiny)
    group = tiny.attn["q"].peftkit["default"].shared
    assert group is not None and len(group.members) == 3
    fused = tiny(ids)
    for name in "qkv":
        tiny.attn[name].peftkit["default"].shared = None
    torch.testing.assert_close(tiny(ids), fused, rtol=1e-6, atol=1e-6)


def test_shared_input_cache_sees_weight_updates(tiny, ids) -> None:
    peftkit.attach(tiny, LoRA(r=3, targets=["q", "k", "v"]))
    randomize(tiny)
    x = tiny.embed(ids)
    first = tiny.attn["q"](x)  # leaves k and v pending in the cache
    with torch.no_grad():
        tiny.attn["k"].peftkit["default"].lora_A.mul_(2.0)  # bumps the version: cache must miss
    out_k = tiny.attn["k"](x)
    d = tiny.attn["k"].peftkit["default"]
    expected = F.linear(x, tiny.attn["k"].weight, tiny.attn["k"].bias) + d.scaling * x @ d.lora_A.T @ d.lora_B.T
    torch.testing.assert_close(out_k, expected)
    assert first is not None


def test_dropout_applies_in_training_only(tiny, ids) -> None:
    peftkit.attach(tiny, LoRA(r=4, dropout=0.5, targets=["q"]))
    randomize(tiny)
    tiny.eval()
    assert torch.equal(tiny(ids), tiny(ids))
    tiny.train()
    assert not torch.equal(tiny(ids), tiny(ids))


def test_pissa_starts_at_base_and_saves_as_plain_lora(tiny, ids, tmp_path) -> None:
    base = copy.deepcopy(tiny)
    before = tiny(ids)
    w0 = tiny.ffn[0].weight.detach().clone()
    peftkit.attach(tiny, LoRA(r=4, alpha=4, init="pissa", targets=["ffn.0", "ffn.2"]))
    torch.testing.assert_close(tiny(ids), before, rtol=1e-4, atol=1e-5)
    d = tiny.ffn[0].peftkit["default"]
    top = torch.linalg.svdvals(w0)[:4]
    torch.testing.assert_close(torch.linalg.svdvals(d.delta_weight())[:4], top, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.linalg.svdvals(tiny.ffn[0].weight.detach())[:1], torch.linalg.svdvals(w0)[4:5])
    randomize(tiny, scale=0.05)  # "training"
    trained = tiny(ids)
    with pytest.raises(ValueError, match="PiSSA"):
        peftkit.routed(tiny, ["default", None, "default", "default", "default", "default"]).__enter__()
    peftkit.save(tiny, tmp_path / "pissa")
    saved = peftkit.read_adapter(tmp_path / "pissa")[0]
    assert saved.init == "zero" and saved.r == 8 and saved.scaling == d.scaling
    peftkit.load(base, tmp_path / "pissa")
    torch.testing.assert_close(base(ids), trained, rtol=1e-4, atol=1e-5)
    peftkit.remove(tiny, "default")
    torch.testing.assert_close(tiny.ffn[0].weight, w0, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"r": 0}, "r"), ({"alpha": -1}, "alpha"), ({"dropout": 1.0}, "dropout"), ({"init": "svd"}, "init"),
     ({"rank": 4}, "rank"), ({"targets": []}, "targets")],
)
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    args = {"targets": ["q"], **kwargs}
    with pytest.raises(ValueError, match=field):
        LoRA(**args)


def test_config_dict_round_trip_and_unknown_method() -> None:
    config = LoRA(r=4, alpha=16, targets=["q", "v"], rslora=True)
    assert peftkit.config_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown PEFT method 'lorra'.*did you mean lora"):
        peftkit.config_from_dict({"method": "lorra", "targets": ["q"]})
    with pytest.raises(ValueError, match="rank"):
        peftkit.config_from_dict({"method": "lora", "targets": ["q"], "rank": 3})


def test_deepcopy_of_adapted_model_runs_and_matches(tiny, ids) -> None:
    peftkit.attach(tiny, LoRA(r=3, targets=["q", "k", "v"]))
    randomize(tiny)
    clone = copy.deepcopy(tiny)
    torch.testing.assert_close(clone(ids), tiny(ids))


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_conv2d_padding_modes_match_merged(mode: str) -> None:
    model = _wrap(nn.Conv2d(2, 4, kernel_size=3, padding=1, padding_mode=mode))
    peftkit.attach(model, LoRA(r=2, targets=["0"]))
    randomize(model)
    x = torch.randn(1, 2, 6, 6)
    unmerged = model(x)
    peftkit.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
