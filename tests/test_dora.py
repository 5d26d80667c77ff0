"""DoRA: the written formula on every host, the detached norm's gradients, merge, routing, files, PEFT interop."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import DoRA, LoRA, TargetError

from .bbc import LEARNS, fit_bbc
from .checks import (assert_merge_roundtrip, assert_routed_grads_match_rows, assert_routed_matches_rows, model_output,
                     needs_peft, row_alone)
from .conftest import randomize

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _wrap(module: nn.Module) -> nn.Sequential:
    return nn.Sequential(module)


def _randomize(model: nn.Module, name: str | None = None) -> None:
    """Random A, B and a magnitude near its start, so m/n really rescales the rows."""
    randomize(model, name)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(".magnitude"):
                p.add_(1.0).abs_()


def _dora_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, s: float) -> torch.Tensor:
    """The paper's W' = m · V / ‖V‖_c with V = W0 + s·BA, in (out, in[, kh, kw]) layout."""
    v = w0 + s * torch.einsum("or,ri...->oi...", b.flatten(1), a)
    norm = v.flatten(1).norm(dim=1).reshape(-1, *(1,) * (v.dim() - 1))
    return m.reshape(norm.shape) * v / norm


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_forward_matches_formula(rslora: bool) -> None:
    model = _wrap(nn.Linear(12, 7))
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.attach(model, DoRA(r=4, alpha=6, rslora=rslora, targets=["0"]))
    _randomize(model)
    d = model[0].peftkit["default"]
    x = torch.randn(4, 3, 12)
    expected = x @ _dora_weight(w0, d.lora_A, d.lora_B, d.magnitude, d.scaling).T + b0
    torch.testing.assert_close(model(x), expected)
    assert not torch.allclose(model(x), x @ w0.T + b0, atol=1e-2)


def test_conv1d_host_uses_transposed_weight() -> None:
    model = _wrap(Conv1D(7, 12))  # GPT-2 layout: weight [in=12, out=7]
    w0 = model[0].weight.detach().clone()
    peftkit.attach(model, DoRA(r=3, alpha=3, targets=["0"]))
    _randomize(model)
    d = model[0].peftkit["default"]
    x = torch.randn(5, 12)
    expected = x @ _dora_weight(w0.T, d.lora_A, d.lora_B, d.magnitude, d.scaling).T + model[0].bias
    torch.testing.assert_close(model(x), expected)


def test_conv2d_forward_merge_and_unmerge() -> None:
    model = _wrap(nn.Conv2d(3, 8, kernel_size=3, padding=1, stride=2))
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.attach(model, DoRA(r=2, alpha=4, targets=["0"]))
    _randomize(model)
    d = model[0].peftkit["default"]
    assert d.magnitude.shape == (1, 8, 1, 1)  # PEFT's layout for conv hosts
    x = torch.randn(2, 3, 9, 9)
    expected = F.conv2d(x, _dora_weight(w0, d.lora_A, d.lora_B, d.magnitude, d.scaling), b0, stride=2, padding=1)
    torch.testing.assert_close(model(x), expected)
    peftkit.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    peftkit.unmerge(model)
    torch.testing.assert_close(model[0].weight, w0, rtol=0, atol=1e-6)


def test_fresh_adapter_is_exact_noop(tiny, ids) -> None:
    before = tiny(ids)
    peftkit.attach(tiny, DoRA(r=4, targets="all-linear", init="gaussian", rank_pattern={"head": 2}))
    d = tiny.attn["q"].peftkit["default"]
    torch.testing.assert_close(d.magnitude, tiny.attn["q"].weight.norm(dim=1), rtol=0, atol=0)  # m = ‖W0‖_c
    assert torch.equal(tiny(ids), before)


def test_norm_is_detached_in_gradients() -> None:
    """Gradients of m, A, B equal the formula's with ‖V‖_c a constant (paper §4.3, as PEFT), not the full ones."""
    model = _wrap(nn.Linear(6, 5))
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.attach(model, DoRA(r=2, alpha=2, targets=["0"]))
    _randomize(model)
    d = model[0].peftkit["default"]
    x = torch.randn(3, 6)
    model(x).square().sum().backward()
    ours = [p.grad.clone() for p in (d.magnitude, d.lora_A, d.lora_B)]
    for detach in (True, False):
        a, b, m = (p.detach().clone().requires_grad_() for p in (d.lora_A, d.lora_B, d.magnitude))
        v = w0 + d.scaling * b @ a
        norm = v.norm(dim=1, keepdim=True)
        out = x @ (m[:, None] * v / (norm.detach() if detach else norm)).T + b0
        grads = torch.autograd.grad(out.square().sum(), (m, a, b))
        close = all(torch.allclose(g, o, rtol=1e-4, atol=1e-6) for g, o in zip(grads, ours))
        assert close is detach


def test_merge_unmerge_roundtrip(tiny, ids) -> None:
    peftkit.attach(tiny, DoRA(r=4, alpha=8, targets=["q", "k", "v", "ffn.0", "ffn.2"]))
    _randomize(tiny)
    assert_merge_roundtrip(tiny, ids, "attn.q.weight")
    assert tiny.attn["q"].peftkit["default"].merged_norm is None


ROWS = ["dora", None, "lora", "dora", "lora", None]


def _dora_lora_base(tiny) -> None:
    peftkit.attach(tiny, DoRA(r=3, alpha=6, targets=["q", "v", "ffn.0"]), "dora")
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "k", "ffn.2"]), "lora")
    _randomize(tiny)


@pytest.mark.parametrize("rows", [ROWS, ["dora", "dora", "lora", None, None, None]])  # permuted and presorted
def test_mixed_batch_with_lora_and_base_equals_rows_alone(tiny, ids, rows) -> None:
    _dora_lora_base(tiny)
    outs = {name: row_alone(tiny, ids, 0, name) for name in ("dora", "lora", None)}
    assert not torch.allclose(outs["dora"], outs[None], atol=1e-3)  # stricter than the shared guard's 1e-4
    assert not torch.allclose(outs["dora"], outs["lora"], atol=1e-3)
    assert_routed_matches_rows(tiny, ids, rows)


def test_mixed_batch_gradients_equal_per_row_sum(tiny, ids) -> None:
    _dora_lora_base(tiny)
    grads = assert_routed_grads_match_rows(tiny, ids, ROWS)
    assert any(n.endswith("dora.magnitude") for n in grads)


def test_embedding_host_is_a_named_error(tiny) -> None:
    with pytest.raises(TargetError, match=r"embed \(Embedding\).*Linear.*Conv2d"):
        peftkit.attach(tiny, DoRA(targets=["embed", "q"]))


@pytest.mark.parametrize(("kwargs", "field"), [({"r": 0}, "r"), ({"init": "pissa"}, "init"), ({"alpha": 0}, "alpha"),
                                               ({"magnitude": 1}, "magnitude")])
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DoRA(**{"targets": ["q"], **kwargs})


def test_own_format_round_trip_is_exact(tiny, ids, tmp_path: Path) -> None:
    fresh = copy.deepcopy(tiny)
    config = DoRA(r=3, alpha=5, targets=["q", "v", "ffn.0"], modules_to_save=["head"])
    peftkit.attach(tiny, config, "mine")
    _randomize(tiny)
    peftkit.save(tiny, tmp_path, "mine")
    assert peftkit.load(fresh, tmp_path) == "mine" and peftkit.adapters(fresh) == {"mine": config}
    assert torch.equal(fresh(ids), tiny(ids))


# --- Hugging Face PEFT interop ---------------------------------------------------------------------------------

def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3,
                                                    initializer_range=0.2)).eval()  # logits far from 0


class ConvNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


CASES = {  # base, PEFT targets, our targets, inputs
    "bert": (_bert, ["query", "value", "intermediate.dense"], lambda: {"input_ids": torch.randint(1, 100, (3, 7))}),
    "conv": (ConvNet, ["0", "3"], lambda: torch.randn(2, 3, 8, 8)),
}


@needs_peft
@pytest.mark.parametrize("case", CASES)
def test_peft_dora_loads_with_same_outputs(case: str, tmp_path: Path) -> None:
    import peft
    make, targets, make_inputs = CASES[case]
    base = make().eval()
    fresh, inputs = copy.deepcopy(base), make_inputs()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                # magnitudes: rows rescaled by up to 2x, so the adapter changes the outputs clearly
                p.copy_(p * (1 + torch.rand_like(p)) if "magnitude" in name else torch.randn_like(p) * 0.3)
    expected = model_output(model, inputs)
    model.save_pretrained(tmp_path)
    peftkit.load(fresh, tmp_path)
    assert isinstance(peftkit.adapters(fresh)["default"], DoRA)
    torch.testing.assert_close(model_output(fresh, inputs), expected, atol=1e-5, rtol=1e-5)
    with peftkit.disabled(fresh):
        assert not torch.allclose(model_output(fresh, inputs), expected, atol=1e-3), "the adapter must change the outputs"


@needs_peft
@pytest.mark.parametrize("case", CASES)
def test_our_dora_loads_in_peft_with_same_outputs(case: str, tmp_path: Path) -> None:
    import peft
    make, targets, make_inputs = CASES[case]
    base = make().eval()
    fresh, inputs = copy.deepcopy(base), make_inputs()
    peftkit.attach(base, DoRA(r=4, alpha=8, targets=targets))
    _randomize(base)
    expected = model_output(base, inputs)
    peftkit.save(base, tmp_path, format="peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    host = "0" if case == "conv" else "bert.encoder.layer.0.attention.self.query"
    assert f"base_model.model.{host}.lora_magnitude_vector" in load_file(str(tmp_path / "adapter_model.safetensors"))
    model = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(model_output(model, inputs), expected, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        assert not torch.allclose(model_output(model, inputs), expected, atol=1e-3)


@needs_peft
def test_dropout_in_training_matches_peft(tmp_path: Path) -> None:
    """In training with dropout PEFT rescales W0·dropout(x), not W0·x; ours does the same, outputs and gradients."""
    import peft
    base = _wrap(nn.Linear(10, 6))
    fresh = copy.deepcopy(base)
    peftkit.attach(base, DoRA(r=3, alpha=6, dropout=0.5, targets=["0"]))
    _randomize(base)
    peftkit.save(base, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True).train()
    base.train()
    x = torch.randn(8, 10)
    outs = []
    for model in (base, theirs):
        torch.manual_seed(1)  # the same dropout mask for both
        out = model(x)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    d = base[0].peftkit["default"]
    layer = theirs.base_model.model[0]
    pairs = ((d.magnitude, layer.lora_magnitude_vector["default"].weight), (d.lora_A, layer.lora_A["default"].weight))
    for ours, their in pairs:
        torch.testing.assert_close(ours.grad, their.grad, rtol=1e-4, atol=1e-5)
    base.eval()
    torch.manual_seed(1)
    assert not torch.allclose(base(x), outs[0], atol=1e-3), "dropout must have mattered"


def test_dora_learns_bbc() -> None:
    result, model, _ = fit_bbc(DoRA(r=8, alpha=16, targets=["query", "value"]))
    assert result.accuracy_after > LEARNS
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))  # DoRA itself trained
