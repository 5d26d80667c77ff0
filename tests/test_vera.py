"""VeRA: the formula with PEFT's shared random projections, sharing, merge, routing, files, PEFT interop."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import LoRA, TargetError, VeRA

from .bbc import LEARNS, fit_bbc
from .checks import (assert_merge_roundtrip, assert_routed_grads_match_rows, assert_routed_matches_rows, model_output,
                     needs_peft, row_alone)
from .conftest import randomize

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _peft_projections(seed: int, r: int, out: int, in_: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vera_A [r, in], vera_B [out, r] exactly as PEFT's VeraModel._init_vera_A_vera_B draws them."""
    from peft.tuners.vera.model import _kaiming_init  # PEFT's own generator of vera_A / vera_B

    generator = torch.Generator(device="cpu").manual_seed(seed)
    return _kaiming_init((r, in_), generator=generator), _kaiming_init((out, r), generator=generator)


def _two_layers() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 7), nn.ReLU(), Conv1D(20, 7))  # Conv1D(out=20, in=7): GPT-2 layout


@needs_peft
def test_forward_matches_formula_with_pefts_projections() -> None:
    """h = W0 x + Λ_b B Λ_d A x, A and B PEFT's draw for the largest (out, in) = (20, 12), sliced per layer."""
    model = _two_layers()
    first, second = copy.deepcopy(model[0]), copy.deepcopy(model[2])
    peftkit.attach(model, VeRA(r=5, targets=["0", "2"], projection_prng_key=3))
    randomize(model)
    a, b = _peft_projections(3, 5, 20, 12)
    d0, d1 = model[0].peftkit["default"], model[2].peftkit["default"]
    x = torch.randn(4, 12)
    h = first(x) + d0.vera_lambda_b * ((d0.vera_lambda_d * (x @ a[:, :12].T)) @ b[:7].T)
    expected = second(h.relu()) + d1.vera_lambda_b * ((d1.vera_lambda_d * (h.relu() @ a[:, :7].T)) @ b[:20].T)
    torch.testing.assert_close(model(x), expected)
    with peftkit.disabled(model):
        assert not torch.allclose(model(x), expected, atol=1e-2)


def test_projections_are_shared_frozen_and_not_saved(tiny) -> None:
    peftkit.attach(tiny, VeRA(r=6, targets=["q", "k", "ffn.0", "ffn.2"]))
    deltas = [m.peftkit["default"] for m in (tiny.attn["q"], tiny.attn["k"], tiny.ffn[0], tiny.ffn[2])]
    owner = deltas[0]
    assert owner.vera_A.shape == (6, 32) and owner.vera_B.shape == (32, 6)  # largest in (ffn.2) and out (ffn.0)
    assert all(d.projections()[0].data_ptr() == owner.vera_A.data_ptr() for d in deltas)  # one storage, sliced
    assert all("vera_A" not in d.state_dict() and "vera_B" not in d.state_dict() for d in deltas)
    assert peftkit.summary(tiny).per_adapter["default"] == sum(6 + d.out_features for d in deltas)  # only d and b
    clone = copy.deepcopy(tiny)  # a copy shares its own owner, not the original's
    assert clone.attn["k"].peftkit["default"]._owner[0] is clone.attn["q"].peftkit["default"]


def test_fresh_adapter_is_exact_noop_and_d_starts_at_d_initial(tiny, ids) -> None:
    before = tiny(ids)
    peftkit.attach(tiny, VeRA(r=8, d_initial=0.25, targets="all-linear"))
    d = tiny.attn["v"].peftkit["default"]
    assert torch.equal(d.vera_lambda_d, torch.full((8,), 0.25)) and torch.equal(d.vera_lambda_b, torch.zeros(16))
    assert torch.equal(tiny(ids), before)


def test_both_vectors_learn_from_the_start(tiny, ids) -> None:
    """b = 0 but d ≠ 0: b gets a gradient at step one (the reason d_initial must be non-zero)."""
    peftkit.attach(tiny, VeRA(r=4, targets=["q"]))
    tiny(ids).square().sum().backward()
    assert tiny.attn["q"].peftkit["default"].vera_lambda_b.grad.abs().sum() > 0


def test_merge_unmerge_roundtrip(tiny, ids) -> None:
    peftkit.attach(tiny, VeRA(r=8, targets="all-linear"))
    randomize(tiny)
    assert_merge_roundtrip(tiny, ids, "ffn.0.weight")


ROWS = ["vera", "lora", None, "vera", None, "lora"]


def test_mixed_batch_with_lora_and_base_equals_rows_alone(tiny, ids) -> None:
    peftkit.attach(tiny, VeRA(r=4, targets=["q", "v", "ffn.0"]), "vera")
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "k"]), "lora")
    randomize(tiny)
    assert not torch.allclose(row_alone(tiny, ids, 0, "vera"), row_alone(tiny, ids, 0, None), atol=1e-3)  # > 1e-4
    assert_routed_matches_rows(tiny, ids, ROWS)
    grads = assert_routed_grads_match_rows(tiny, ids, ROWS)
    assert any(n.endswith("vera.vera_lambda_d") for n in grads)


def test_embedding_host_is_a_named_error(tiny) -> None:
    with pytest.raises(TargetError, match=r"embed \(Embedding\)"):
        peftkit.attach(tiny, VeRA(targets=["embed"]))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "r"), ({"r": -4}, "r"), ({"d_initial": 0.0}, "d_initial"), ({"d_initial": float("nan")}, "d_initial"),
    ({"d_initial": float("inf")}, "d_initial"), ({"dropout": 1.0}, "dropout"),
    ({"projection_prng_key": -1}, "projection_prng_key"), ({"rank": 4}, "rank"),
])
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        VeRA(**{"targets": ["q"], **kwargs})


def test_own_format_stores_the_seed_not_the_projections(tiny, ids, tmp_path: Path) -> None:
    fresh = copy.deepcopy(tiny)
    config = VeRA(r=16, targets=["q", "v", "ffn.0"], projection_prng_key=11, modules_to_save=["head"])
    peftkit.attach(tiny, config, "mine")
    randomize(tiny)
    peftkit.save(tiny, tmp_path, "mine")
    keys = set(load_file(str(tmp_path / "adapter.safetensors")))
    assert {k.rpartition(".")[2] for k in keys} == {"vera_lambda_b", "vera_lambda_d", "weight", "bias"}
    assert json.loads((tmp_path / "peftkit_adapter.json").read_text())["config"]["projection_prng_key"] == 11
    peftkit.load(fresh, tmp_path)
    assert peftkit.adapters(fresh) == {"mine": config}
    assert torch.equal(fresh(ids), tiny(ids))


# --- Hugging Face PEFT interop ---------------------------------------------------------------------------------

def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3,
                                                    initializer_range=0.2)).eval()  # logits far from 0


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


CASES = {  # base, targets (PEFT's and ours): mixed in/out sizes, so slicing matters
    "bert": (_bert, ["query", "value", "intermediate.dense", "output.dense"]),
    "gpt2-conv1d": (_gpt2, ["c_attn", "c_fc", "mlp.c_proj"]),
}


def _save_peft_vera(case: str, path: Path, **kwargs) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Save a randomised PEFT VeRA adapter; return (fresh base, inputs, PEFT's outputs)."""
    import peft
    make, targets = CASES[case]
    base = make()
    fresh, ids = copy.deepcopy(base), torch.randint(1, 100, (3, 7))
    config = peft.VeraConfig(r=8, target_modules=targets, projection_prng_key=5, fan_in_fan_out=case.startswith("gpt2"),
                             **kwargs)
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn_like(p))
    model.save_pretrained(path)
    return fresh, ids, model_output(model, ids)


@needs_peft
@pytest.mark.parametrize("case", CASES)
def test_peft_vera_loads_with_same_outputs(case: str, tmp_path: Path) -> None:
    fresh, ids, expected = _save_peft_vera(case, tmp_path)
    assert "base_model.vera_A" in load_file(str(tmp_path / "adapter_model.safetensors"))
    peftkit.load(fresh, tmp_path)
    assert isinstance(peftkit.adapters(fresh)["default"], VeRA)
    torch.testing.assert_close(model_output(fresh, ids), expected, atol=1e-5, rtol=1e-5)
    with peftkit.disabled(fresh):
        assert not torch.allclose(model_output(fresh, ids), expected, atol=1e-3), "the adapter must change the outputs"


@needs_peft
@pytest.mark.filterwarnings("ignore:Specified to not save vera_A")
def test_peft_vera_without_saved_projections_loads(tmp_path: Path) -> None:
    fresh, ids, expected = _save_peft_vera("bert", tmp_path, save_projection=False)
    peftkit.load(fresh, tmp_path)
    torch.testing.assert_close(model_output(fresh, ids), expected, atol=1e-5, rtol=1e-5)


@needs_peft
def test_peft_vera_with_other_projections_is_a_named_error(tmp_path: Path) -> None:
    fresh, _, _ = _save_peft_vera("bert", tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 1.001
    save_file(tensors, str(weights))
    with pytest.raises(peftkit.AdapterFileError, match="projection_prng_key=5"):
        peftkit.load(fresh, tmp_path)
    assert peftkit.adapters(fresh) == {}


@needs_peft
@pytest.mark.parametrize("case", CASES)
def test_our_vera_loads_in_peft_with_same_outputs(case: str, tmp_path: Path) -> None:
    import peft
    make, targets = CASES[case]
    base = make()
    fresh, ids = copy.deepcopy(base), torch.randint(1, 100, (3, 7))
    peftkit.attach(base, VeRA(r=8, targets=targets, projection_prng_key=9))
    randomize(base, scale=1.0)
    expected = model_output(base, ids)
    peftkit.save(base, tmp_path, format="peft")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA" and saved["projection_prng_key"] == 9 and saved["save_projection"] is True
    model = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(model_output(model, ids), expected, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        assert not torch.allclose(model_output(model, ids), expected, atol=1e-3)


def test_exclude_is_saved_as_the_chosen_modules(tmp_path: Path) -> None:
    """PEFT's VeRA has no exclude_modules: the file lists the modules we chose, so PEFT sizes A, B as we did."""
    base = _bert()
    peftkit.attach(base, VeRA(r=4, targets=["query", "dense"], exclude=["intermediate.dense"]))
    peftkit.save(base, tmp_path, format="peft")
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert "bert.encoder.layer.0.attention.self.query" in targets and not any("intermediate" in t for t in targets)


def test_vera_learns_bbc() -> None:
    result, model, _ = fit_bbc(VeRA(r=256, targets=["query", "value"]), lr=1e-2)
    assert result.accuracy_after > LEARNS
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("vera_lambda_b"))  # VeRA trained
