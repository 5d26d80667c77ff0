"""(IA)³ and SSF: the written formulas, exact no-op start, merge, routing, files, PEFT interop, learning."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import IA3, SSF, LoRA, TargetError

from .bbc import LEARNS, fit_bbc
from .checks import (assert_merge_roundtrip, assert_routed_grads_match_rows, assert_routed_matches_rows, model_output,
                     needs_peft)
from .conftest import randomize

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _perturb(model: nn.Module, name: str | None = None) -> None:
    """Move every (IA)³ / SSF vector away from its start (1 or 0), keeping scales far from zero."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".peftkit." in pname and (name is None or f".peftkit.{name}." in pname):
                p.add_(torch.randn_like(p) * 0.3)


# --- formulas ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv1d", [False, True])
def test_ia3_forward_matches_formula(conv1d: bool) -> None:
    make = (lambda i, o: Conv1D(o, i)) if conv1d else nn.Linear
    model = nn.Sequential(make(8, 6), make(6, 5))
    for m in model:
        nn.init.normal_(m.weight)  # Conv1D starts at std 0.02: outputs too small to tell apart
    peftkit.attach(model, IA3(targets=["0", "1"], feedforward=["1"]))
    _perturb(model)
    (w0, b0), (w1, b1) = [(m.weight.T if conv1d else m.weight, m.bias) for m in model]  # [out, in]
    l0, l1 = model[0].peftkit["default"].ia3_l, model[1].peftkit["default"].ia3_l
    assert l0.shape == (6, 1) and l1.shape == (1, 6)  # PEFT's layout: output form (out, 1), feed-forward (1, in)
    x = torch.randn(4, 3, 8)
    h = l0.flatten() * (x @ w0.T + b0)  # keys/values: h = l ⊙ (W x + b)
    expected = (l1.flatten() * h) @ w1.T + b1  # feed-forward: h = W (l ⊙ x) + b
    torch.testing.assert_close(model(x), expected)
    with peftkit.disabled(model):
        assert not torch.allclose(model(x), expected, atol=1e-2)


def test_feedforward_scale_runs_before_the_host_and_stacks_by_product() -> None:
    """Two active feed-forward vectors multiply (as their folds do, and as in HF PEFT); a LoRA on the same host
    reads the unscaled input; an input passed by keyword is scaled too; merging both equals running them."""
    host = nn.Linear(8, 5)
    model = nn.Sequential(host)
    for name in ("a", "b"):
        peftkit.attach(model, IA3(targets=["0"], feedforward=["0"]), name=name)
    peftkit.attach(model, LoRA(r=2, targets=["0"]), name="lora")
    _perturb(model)
    peftkit.activate(model, ["a", "b", "lora"])
    la, lb = (host.peftkit[n].ia3_l.flatten() for n in ("a", "b"))
    lora = host.peftkit["lora"]
    x = torch.randn(3, 8)
    expected = F.linear(la * lb * x, host.weight, host.bias) + lora.scaling * x @ lora.lora_A.T @ lora.lora_B.T
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(host(input=x), expected)
    peftkit.activate(model, ["a", "b"])
    unmerged = model(x)
    peftkit.merge(model, ["a", "b"])
    torch.testing.assert_close(model(x), unmerged)


def test_ssf_forward_matches_formula_on_linear_conv2d_and_layernorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(2), nn.Linear(25, 6), nn.LayerNorm(6))
    peftkit.attach(model, SSF(targets=["0", "2", "3"]))
    _perturb(model)
    d = {i: model[i].peftkit["default"] for i in (0, 2, 3)}
    x = torch.randn(2, 3, 5, 5)
    h = F.conv2d(x, model[0].weight, model[0].bias, padding=1) * d[0].scale.view(1, 4, 1, 1) + d[0].shift.view(1, 4, 1, 1)
    h = (h.flatten(2) @ model[2].weight.T + model[2].bias) * d[2].scale + d[2].shift
    h = F.layer_norm(h, (6,), model[3].weight, model[3].bias) * d[3].scale + d[3].shift
    torch.testing.assert_close(model(x), h)


@pytest.mark.parametrize("config", [IA3(targets=["k", "v", "ffn.2"], feedforward=["ffn.2"]),
                                    SSF(targets=["type:Linear"])])
def test_fresh_adapter_is_an_exact_noop(tiny, ids, config) -> None:
    before = tiny(ids)
    peftkit.attach(tiny, config)
    assert torch.equal(tiny(ids), before)


# --- merging -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "changed"), [
    (IA3(targets=["k", "v", "ffn.2"], feedforward=["ffn.2"]), "ffn.2.weight"),
    (IA3(targets=["k", "v", "ffn.2"], feedforward=["ffn.2"]), "attn.k.bias"),
    (SSF(targets=["q", "k", "ffn.0", "ffn.2"]), "ffn.0.bias"),
])
def test_merge_equals_unmerged_and_unmerge_restores(tiny, ids, config, changed: str) -> None:
    peftkit.attach(tiny, config)
    _perturb(tiny)
    assert_merge_roundtrip(tiny, ids, changed)


def test_ssf_merges_into_conv2d_and_layernorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(3))
    peftkit.attach(model, SSF(targets=["0", "1"]))
    _perturb(model)
    assert_merge_roundtrip(model, torch.randn(2, 3, 5, 5), "1.bias")


def test_zero_scale_cannot_merge_and_unmerge_undoes_the_merged_scale(tiny, ids) -> None:
    peftkit.attach(tiny, IA3(targets=["k", "ffn.2"], feedforward=["ffn.2"]))
    scale = tiny.ffn[2].peftkit["default"].ia3_l
    base = tiny.ffn[2].weight.detach().clone()
    with torch.no_grad():
        scale[0, 3] = 0.0
    with pytest.raises(peftkit.MergeError, match="cannot merge.*1 zero entries"):
        peftkit.merge(tiny)
    assert torch.equal(tiny.ffn[2].weight, base)  # refused before any host changed
    with torch.no_grad():
        scale[0, 3] = 2.0
    peftkit.merge(tiny)
    with torch.no_grad():
        scale[0, 3] = 0.0  # trained while merged: unmerge divides by the scale it folded in, not by zero
    peftkit.unmerge(tiny)
    torch.testing.assert_close(tiny.ffn[2].weight, base, rtol=0, atol=1e-6)


def test_ssf_shift_cannot_merge_into_a_host_without_bias(tiny) -> None:
    peftkit.attach(tiny, SSF(targets=["v"]))  # attn.v has no bias
    with pytest.raises(ValueError, match="without a bias"):
        peftkit.merge(tiny)


# --- routing -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [IA3(targets=["q", "v", "ffn.2"], feedforward=["ffn.2"]),
                                    SSF(targets=["q", "v", "ffn.0"])])
def test_mixed_batch_with_lora_and_base_equals_rows_alone(tiny, ids, config) -> None:
    peftkit.attach(tiny, config, "mine")
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "k", "ffn.2"]), "lora")
    _perturb(tiny, "mine")
    randomize(tiny, "lora")
    rows = ["mine", "lora", None, "mine", None, "lora"]
    assert_routed_matches_rows(tiny, ids, rows)
    grads = assert_routed_grads_match_rows(tiny, ids, rows)
    assert any(".peftkit.mine." in n for n in grads) and any(".peftkit.lora." in n for n in grads)


# --- configs and files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "field"), [
    (lambda: IA3(targets=["k"], feedforward="(unclosed"), "feedforward"),
    (lambda: IA3(targets=["k"], feedforward=["type:Linear"]), "feedforward"),
    (lambda: IA3(targets=["k"], feed_forward=["k"]), "feed_forward"),
    (lambda: SSF(targets=["k"], scale=2.0), "scale"),
    (lambda: SSF(targets=[]), "targets"),
])
def test_invalid_config_names_the_field(make, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make()


def test_feedforward_outside_targets_and_wrong_hosts_are_named_errors(tiny) -> None:
    with pytest.raises(ValueError, match="feedforward entry 'ffn.2' matches none"):
        peftkit.attach(tiny, IA3(targets=["k"], feedforward=["ffn.2"]))
    with pytest.raises(TargetError, match=r"embed \(Embedding\)"):
        peftkit.attach(tiny, SSF(targets=["embed"]))
    assert peftkit.adapters(tiny) == {}


@pytest.mark.parametrize("config", [IA3(targets=["k", "v", "ffn.2"], feedforward="ffn\\.2", modules_to_save=["head"]),
                                    SSF(targets=["q", "ffn.0"])])
def test_save_load_roundtrip_is_exact(tiny, ids, tmp_path: Path, config) -> None:
    fresh = copy.deepcopy(tiny)
    peftkit.attach(tiny, config, "mine")
    _perturb(tiny)
    peftkit.save(tiny, tmp_path, "mine")
    peftkit.load(fresh, tmp_path)
    assert peftkit.adapters(fresh) == {"mine": config}
    assert torch.equal(fresh(ids), tiny(ids))


def test_ssf_has_no_peft_format(tiny, tmp_path: Path) -> None:
    peftkit.attach(tiny, SSF(targets=["q"]))
    with pytest.raises(ValueError, match="no Hugging Face PEFT equivalent"):
        peftkit.save(tiny, tmp_path, format="peft")


# --- Hugging Face PEFT interop -----------------------------------------------------------------------------------

def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3,
                                                    initializer_range=0.2)).eval()


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


CASES = {  # base, targets, feedforward (PEFT's BERT and GPT-2 defaults)
    "bert": (_bert, ["key", "value", "output.dense"], ["output.dense"]),
    "bert-regex": (_bert, ".*(key|value|output\\.dense)", ".*layer\\.\\d\\.output\\.dense"),
    "gpt2-conv1d": (_gpt2, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


@needs_peft
@pytest.mark.parametrize("case", CASES)
def test_peft_ia3_loads_with_same_outputs(case: str, tmp_path: Path) -> None:
    import peft
    make, targets, feedforward = CASES[case]
    base = make()
    fresh, ids = copy.deepcopy(base), torch.randint(1, 100, (3, 7))
    config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=case.startswith("gpt2"))
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(tmp_path)
    expected = model_output(model, ids)
    peftkit.load(fresh, tmp_path)
    loaded = peftkit.adapters(fresh)["default"]
    peft_feedforward = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if getattr(m, "is_feedforward", False)}
    assert isinstance(loaded, IA3) and peft_feedforward and set(loaded.feedforward) == peft_feedforward
    torch.testing.assert_close(model_output(fresh, ids), expected, atol=1e-5, rtol=1e-5)
    with peftkit.disabled(fresh):
        assert not torch.allclose(model_output(fresh, ids), expected, atol=1e-3), "the adapter must change the outputs"


@needs_peft
@pytest.mark.parametrize("case", CASES)
def test_our_ia3_loads_in_peft_with_same_outputs(case: str, tmp_path: Path) -> None:
    import peft
    make, targets, feedforward = CASES[case]
    base = make()
    fresh, ids = copy.deepcopy(base), torch.randint(1, 100, (3, 7))
    peftkit.attach(base, IA3(targets=targets, feedforward=feedforward))
    _perturb(base)
    expected = model_output(base, ids)
    peftkit.save(base, tmp_path, format="peft")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and set(saved["feedforward_modules"]) <= set(saved["target_modules"])
    model = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(model_output(model, ids), expected, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        assert not torch.allclose(model_output(model, ids), expected, atol=1e-3)


# --- learning ----------------------------------------------------------------------------------------------------

def test_ia3_learns_bbc() -> None:
    result, model, _ = fit_bbc(IA3(targets=["key", "value", "output.dense"], feedforward=["output.dense"]), lr=1e-2)
    assert result.accuracy_after > LEARNS
    assert any(not torch.all(p == 1) for n, p in model.named_parameters() if n.endswith("ia3_l"))  # (IA)³ trained


def test_ssf_learns_bbc() -> None:
    result, model, _ = fit_bbc(SSF(targets=["type:Linear", "type:LayerNorm"], exclude=["classifier"]), lr=1e-2)
    assert result.accuracy_after > LEARNS
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".shift"))  # SSF trained
