"""LoHa and LoKr: the written formulas on every host (float64 by hand), zero init, merge, routing, dropouts,
named errors, and Hugging Face PEFT files both ways with equal outputs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import LoHa, LoKr, LoRA

from .checks import assert_merge_roundtrip, assert_routed_grads_match_rows, assert_routed_matches_rows, needs_peft
from .conftest import randomize
from .peft_checks import (ConvNet, assert_peft_loads_in_peftkit, assert_peftkit_loads_in_peft, bert_inputs,
                          image_inputs, tiny_bert)


def _attached(host: nn.Module, config: peftkit.AdapterConfig) -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    """Host wrapped, the adapter attached with random factors; the factors in float64."""
    model = nn.Sequential(host)
    peftkit.attach(model, config.model_copy(update={"targets": ["0"]}))
    randomize(model)
    delta = model[0].peftkit["default"]
    return model, {name: p.detach().double() for name, p in delta.named_parameters()}


def _linear_expected(model: nn.Sequential, x: torch.Tensor, delta_w: torch.Tensor) -> torch.Tensor:
    """x (W0 + ΔW)ᵀ + b in float64, W0 read in (out, in) layout whatever the host stores."""
    host = model[0]
    w0 = host.weight.detach().double()
    w0 = w0.T if isinstance(host, Conv1D) else w0
    return x.double() @ (w0 + delta_w).T + host.bias.detach().double()


# --- LoHa -----------------------------------------------------------------------------------------------------

def _hadamard(f: dict[str, torch.Tensor], s: float) -> torch.Tensor:
    return s * (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])


@pytest.mark.parametrize(("make", "r", "factored"), [
    (lambda: nn.Linear(40, 32), 2, True),  # r²(in + out) < in·out: ΔW x = U (V x), ΔW never built
    (lambda: nn.Linear(12, 10), 3, False),  # ΔW built per forward (PEFT's way)
    (lambda: Conv1D(32, 40), 2, True),  # GPT-2 layout: weight [in=40, out=32]
])
def test_loha_forward_matches_formula(make, r: int, factored: bool) -> None:
    model, f = _attached(make(), LoHa(r=r, alpha=5, targets=["x"]))
    assert model[0].peftkit["default"]._factored is factored
    x = torch.randn(3, 4, f["hada_w1_b"].shape[1])
    expected = _linear_expected(model, x, _hadamard(f, 5 / r))
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("effective", [False, True])
def test_loha_conv2d_forward_matches_formula(effective: bool) -> None:
    host = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    model, f = _attached(host, LoHa(r=2, alpha=3, use_effective_conv2d=effective, targets=["x"]))
    if effective:  # ΔW_i[o, c, k, l] = Σ_pq W_ia[p, o] T_i[p, q, k, l] W_ib[q, c]
        pair = [(f[f"hada_w{i}_a"].T @ f[f"hada_t{i}"].permute(2, 3, 0, 1) @ f[f"hada_w{i}_b"]).permute(2, 3, 0, 1)
                for i in (1, 2)]
        delta_w = 1.5 * pair[0] * pair[1]
    else:
        delta_w = _hadamard(f, 1.5).reshape(6, 4, 3, 3)
    x = torch.randn(2, 4, 7, 7)
    expected = F.conv2d(x.double(), host.weight.detach().double() + delta_w, host.bias.detach().double(),
                        stride=2, padding=1)
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


# --- LoKr -----------------------------------------------------------------------------------------------------

def _factor(f: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    return f[f"lokr_w{i}"] if f"lokr_w{i}" in f else f[f"lokr_w{i}_a"] @ f[f"lokr_w{i}_b"]


@pytest.mark.parametrize(("fields", "tensors"), [
    # Linear(12 -> 8): out 8 = 2·4, in 12 = 3·4 (PEFT's factorization); W1 [2, 3], W2 [4, 4]
    ({"r": 1}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),  # r < max(4, 4)/2: low-rank W2
    ({"r": 1, "decompose_both": True}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),  # and r < max(2, 3)/2
    ({"r": 2}, {"lokr_w1", "lokr_w2"}),  # r ≥ 4/2: full W2
    ({"r": 1, "decompose_factor": 2}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),  # 8 = 2·4, 12 = 2·6
])
@pytest.mark.parametrize("make", [lambda: nn.Linear(12, 8), lambda: Conv1D(8, 12)])
def test_lokr_forward_matches_formula(make, fields: dict, tensors: set[str]) -> None:
    model, f = _attached(make(), LoKr(alpha=3, targets=["x"], **fields))
    assert set(f) == tensors
    w1, w2 = _factor(f, 1), _factor(f, 2)
    assert w1.shape == ((2, 2) if "decompose_factor" in fields else (2, 3))
    x = torch.randn(5, 12)
    expected = _linear_expected(model, x, 3 / fields["r"] * torch.kron(w1, w2))
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("fields", "tensors"), [
    ({"r": 1}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),  # W2 [4, r]·[r, 2·3·3] (out 8 = 2·4, in 4 = 2·2)
    ({"r": 1, "use_effective_conv2d": True}, {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
    ({"r": 2}, {"lokr_w1", "lokr_w2"}),  # full W2 [4, 2, 3, 3]
])
def test_lokr_conv2d_forward_matches_formula(fields: dict, tensors: set[str]) -> None:
    host = nn.Conv2d(4, 8, 3, padding=1)
    model, f = _attached(host, LoKr(alpha=2, targets=["x"], **fields))
    assert set(f) == tensors
    w1 = f["lokr_w1"]  # [2, 2]
    if "lokr_t2" in f:  # W2[o, c, k, l] = Σ_pq W2a[p, o] T[p, q, k, l] W2b[q, c]
        w2 = (f["lokr_w2_a"].T @ f["lokr_t2"].permute(2, 3, 0, 1) @ f["lokr_w2_b"]).permute(2, 3, 0, 1)
    else:
        w2 = _factor(f, 2).reshape(4, 2, 3, 3)
    # (W1 ⊗ W2)[i·4 + p, j·2 + q, k, l] = W1[i, j] W2[p, q, k, l]
    delta_w = torch.einsum("ij,pqkl->ipjqkl", w1, w2).reshape(8, 4, 3, 3) * 2 / fields["r"]
    x = torch.randn(2, 4, 6, 6)
    expected = F.conv2d(x.double(), host.weight.detach().double() + delta_w, host.bias.detach().double(), padding=1)
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


# --- both -----------------------------------------------------------------------------------------------------

CONFIGS = {
    "loha": LoHa(r=2, alpha=4, targets="all-linear"),
    "lokr": LoKr(r=1, alpha=2, decompose_both=True, targets="all-linear"),
}


@pytest.mark.parametrize("method", CONFIGS)
def test_fresh_adapter_is_exact_noop(tiny, ids, method: str) -> None:
    before = tiny(ids)
    peftkit.attach(tiny, CONFIGS[method])
    assert all(p.abs().sum() > 0 for n, p in tiny.named_parameters() if n.endswith("w2_a"))
    assert torch.equal(tiny(ids), before)


@pytest.mark.parametrize("method", CONFIGS)
def test_merge_unmerge_roundtrip(tiny, ids, method: str) -> None:
    peftkit.attach(tiny, CONFIGS[method])
    randomize(tiny)
    assert_merge_roundtrip(tiny, ids, "attn.q.weight")


def test_merge_roundtrip_conv2d() -> None:
    model = ConvNet()
    for i, config in enumerate([LoHa(r=2, use_effective_conv2d=True, targets=["0"]), LoKr(r=1, targets=["0"])]):
        peftkit.attach(model, config, f"a{i}")
        randomize(model)
        assert_merge_roundtrip(model, image_inputs(), "0.weight")


@pytest.mark.parametrize("method", CONFIGS)
def test_mixed_batch_with_lora_and_base_equals_rows_alone(tiny, ids, method: str) -> None:
    config = CONFIGS[method].model_copy(update={"targets": ["q", "v", "ffn.0", "ffn.2"]})
    peftkit.attach(tiny, config, "a")
    peftkit.attach(tiny, config.model_copy(update={"alpha": 3.0}), "b")
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "k", "ffn.2"]), "lora")
    randomize(tiny)
    rows = ["a", None, "lora", "b", "a", None]
    assert_routed_matches_rows(tiny, ids, rows)
    assert_routed_matches_rows(tiny, ids, ["a", "a", "b", "lora", None, None])  # presorted: slices
    grads = assert_routed_grads_match_rows(tiny, ids, rows)
    assert any(".peftkit.b." in n for n in grads)


@pytest.mark.parametrize(("config", "scaled"), [(LoHa(r=2, rank_dropout=0.5, targets=["0"]), True),
                                                (LoKr(r=1, rank_dropout=0.5, targets=["0"]), False),
                                                (LoKr(r=1, rank_dropout=0.5, rank_dropout_scale=True, targets=["0"]), True)])
def test_rank_dropout_drops_output_rows_in_training_only(config: peftkit.AdapterConfig, scaled: bool) -> None:
    model, _ = _attached(nn.Linear(12, 8), config)
    delta = model[0].peftkit["default"]
    x = torch.randn(4, 12)
    with torch.no_grad():
        base = F.linear(x, model[0].weight, model[0].bias)
        increment = x @ delta.delta_weight().T
        torch.testing.assert_close(model.eval()(x), base + increment)  # eval: no dropout
        torch.manual_seed(5)
        drop = (torch.rand(8) > 0.5).float()  # PEFT's draw: one per output row of ΔW
        assert 0 < drop.sum() < 8
        drop = drop / drop.mean() if scaled else drop
        torch.manual_seed(5)
        torch.testing.assert_close(model.train()(x), base + increment * drop)


def test_module_dropout_skips_the_delta_in_training_only() -> None:
    model, _ = _attached(nn.Linear(12, 8), LoHa(r=2, module_dropout=0.999, targets=["0"]))
    x = torch.randn(4, 12)
    with torch.no_grad():
        base = F.linear(x, model[0].weight, model[0].bias)
        assert not torch.allclose(model.eval()(x), base, atol=1e-3)
        torch.testing.assert_close(model.train()(x), base)


def test_loha_rank_above_host_is_a_named_error() -> None:
    model = nn.Sequential(nn.Linear(4, 6))
    with pytest.raises(ValueError, match=r"loha cannot adapt module '0'.*r=5 exceeds min\(out, in\) = min\(6, 4\)"):
        peftkit.attach(model, LoHa(r=5, targets=["0"]))
    peftkit.attach(model, LoKr(r=64, targets=["0"]))  # LoKr: a large rank means full factors (PEFT's rule)
    assert {n for n, _ in model[0].peftkit["default"].named_parameters()} == {"lokr_w1", "lokr_w2"}


@pytest.mark.parametrize(("make", "kwargs", "field"), [
    (LoHa, {"r": 0}, "r"), (LoHa, {"alpha": 0}, "alpha"), (LoHa, {"rank_dropout": 1.0}, "rank_dropout"),
    (LoKr, {"decompose_factor": 0}, "decompose_factor"), (LoKr, {"module_dropout": -0.1}, "module_dropout"),
    (LoKr, {"init_weights": "lycoris"}, "init_weights"),  # an option we do not have is refused, not ignored
])
def test_invalid_config_names_the_field(make, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make(targets=["q"], **kwargs)


@pytest.mark.parametrize("method", CONFIGS)
def test_own_format_round_trip_is_exact(tiny, ids, method: str, tmp_path: Path) -> None:
    import copy
    fresh = copy.deepcopy(tiny)
    peftkit.attach(tiny, CONFIGS[method], "mine")
    randomize(tiny)
    peftkit.save(tiny, tmp_path, "mine")
    assert peftkit.load(fresh, tmp_path) == "mine" and peftkit.adapters(fresh) == {"mine": CONFIGS[method]}
    assert torch.equal(fresh(ids), tiny(ids))


# --- Hugging Face PEFT interop ---------------------------------------------------------------------------------

BERT_TARGETS = ["query", "value", "intermediate.dense"]
PEFT_CASES = {  # name: (base, inputs, PEFT config kwargs, our config)
    "loha-bert": (tiny_bert, bert_inputs, ("LoHaConfig", {"r": 4, "alpha": 8, "target_modules": BERT_TARGETS})),
    "loha-conv": (ConvNet, image_inputs, ("LoHaConfig", {"r": 2, "alpha": 3, "target_modules": ["0", "3"]})),
    "loha-conv-effective": (ConvNet, image_inputs, ("LoHaConfig", {"r": 2, "target_modules": ["0"],
                                                                   "use_effective_conv2d": True})),
    "lokr-bert": (tiny_bert, bert_inputs, ("LoKrConfig", {"r": 8, "alpha": 4, "target_modules": BERT_TARGETS})),
    "lokr-bert-low-rank-both": (tiny_bert, bert_inputs, ("LoKrConfig", {"r": 1, "alpha": 2, "decompose_both": True,
                                                                       "target_modules": BERT_TARGETS})),
    "lokr-bert-factor": (tiny_bert, bert_inputs, ("LoKrConfig", {"r": 2, "decompose_factor": 4,
                                                                "target_modules": BERT_TARGETS})),
    "lokr-conv": (ConvNet, image_inputs, ("LoKrConfig", {"r": 1, "target_modules": ["0", "3"]})),
    "lokr-conv-effective": (ConvNet, image_inputs, ("LoKrConfig", {"r": 1, "target_modules": ["0"],
                                                                   "use_effective_conv2d": True})),
}


@needs_peft
@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_adapter_loads_with_same_outputs(case: str, tmp_path: Path) -> None:
    import peft
    make, make_inputs, (cls, kwargs) = PEFT_CASES[case]
    marker, ours = ("hada_", LoHa) if cls == "LoHaConfig" else ("lokr_", LoKr)
    assert_peft_loads_in_peftkit(make, make_inputs(), getattr(peft, cls)(**kwargs), marker, tmp_path, ours)


@needs_peft
@pytest.mark.parametrize("case", PEFT_CASES)
def test_our_adapter_loads_in_peft_with_same_outputs(case: str, tmp_path: Path) -> None:
    make, make_inputs, (cls, kwargs) = PEFT_CASES[case]
    fields = {("targets" if k == "target_modules" else k): v for k, v in kwargs.items()}
    config = (LoHa if cls == "LoHaConfig" else LoKr)(**fields)
    saved = assert_peftkit_loads_in_peft(make, make_inputs(), config, tmp_path, randomize)
    assert saved["peft_type"] == config.peft_type and saved["r"] == config.r


@needs_peft
@pytest.mark.parametrize(("option", "value"), [("rank_pattern", {"query": 2}), ("alpha_pattern", {"query": 2})])
def test_unsupported_peft_option_is_a_named_error(option: str, value, tmp_path: Path) -> None:
    import json
    import peft
    model = peft.get_peft_model(tiny_bert(), peft.LoHaConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, option: value}))
    with pytest.raises(peftkit.AdapterFileError, match=f"LOHA option {option}="):
        peftkit.load(tiny_bert(), tmp_path)


def test_conv1d_host_refuses_peft_format(tmp_path: Path) -> None:
    model = nn.Sequential(Conv1D(8, 12))
    peftkit.attach(model, LoKr(r=1, targets=["0"]))
    with pytest.raises(ValueError, match="PEFT's LOKR has no layer for GPT-2's Conv1D"):
        peftkit.save(model, tmp_path, format="peft")
