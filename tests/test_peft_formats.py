"""Hugging Face PEFT files both ways for every method with a PEFT equivalent, and strict loading.

- every config with `to_peft`: peftkit saves, `PeftModel.from_pretrained` loads, outputs equal; PEFT saves,
  peftkit loads, outputs equal (prompt learning on a sequence classifier without modules_to_save included);
- PEFT's target rules (target_modules, exclude_modules, layers_to_transform / layers_pattern, all-linear) decide
  which modules a PEFT file adapts; tensors outside them, targets matching nothing and missing tensors are named
  errors (`strict=False`: PEFT's warnings);
- rank_pattern / alpha_pattern and bias="lora_only" / "all" load and save with PEFT's outputs;
- NaN / inf tensors and a LoRA rank above a layer's min(in, out) are named errors.
Every adapter is made non-trivial first (random factors), so a silently dropped tensor cannot pass.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit import LoRA
from peftkit.core.config import METHODS

from .checks import model_output, needs_peft
from .conftest import randomize
from .sequence_checks import VOCAB

try:
    import peft
except ImportError:  # only tests marked needs_peft use it
    peft = None

ATOL = 1e-5
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),  # PEFT's own noise:
              pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match"),
              pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")]


def tiny_bert() -> nn.Module:
    """A 2-layer BERT classifier whose outputs move visibly with an adapter (the default init gives near-zero logits)."""
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3, initializer_range=0.2)
    return BertForSequenceClassification(config).eval()


def tiny_llama() -> nn.Module:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (3, 6))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _randomize_peft(model: nn.Module) -> None:
    """Move every trainable PEFT tensor (factors, vectors, prompts, head copies, biases) off its start; a head copy's
    original (trainable under bias="all" but outside the forward pass, so never trained) keeps the base's values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".original_module." not in name:
                p.add_(torch.randn_like(p) * 0.3)


# --- every method with a PEFT equivalent, both ways ----------------------------------------------------------------

def _cases() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], Callable[[], Any]]]:
    """method -> (tiny model, peftkit config, PEFT config); prompt learning on BERT is SEQ_CLS without modules_to_save."""
    from peftkit import (IA3, OFT, VeRA, AdaLoRA, DoRA, LlamaAdapter, LoHa, LoKr, LoRAFA, LoRAPlus, PrefixTuning,
                         PromptTuning, PTuning, ReLoRA)

    qv = ["query", "value"]
    return {
        "lora": (tiny_bert, lambda: LoRA(r=2, alpha=4, targets=qv, bias="lora_only"),
                 lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=qv, bias="lora_only")),
        "dora": (tiny_bert, lambda: DoRA(r=2, alpha=4, targets=qv),
                 lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=qv, use_dora=True)),
        "lorafa": (tiny_bert, lambda: LoRAFA(r=2, alpha=4, targets=qv, rank_pattern={"value": 3}),
                   lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=qv, rank_pattern={"value": 3})),
        "loraplus": (tiny_bert, lambda: LoRAPlus(r=2, alpha=4, targets=qv, lr_ratio=4),
                     lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=qv)),
        "relora": (tiny_bert, lambda: ReLoRA(r=2, alpha=4, targets=qv, restart_every=5),
                   lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=qv)),
        "adalora": (tiny_bert, lambda: AdaLoRA(init_r=4, target_r=2, total_step=10, targets=qv),
                    lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=qv)),
        "vera": (tiny_bert, lambda: VeRA(r=4, targets=qv), lambda: peft.VeraConfig(r=4, target_modules=qv)),
        "ia3": (tiny_bert, lambda: IA3(targets=["key", "value", "output.dense"], feedforward=["output.dense"]),
                lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                       feedforward_modules=["output.dense"])),
        "prompt_tuning": (tiny_bert, lambda: PromptTuning(num_virtual_tokens=3),
                          lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
        "p_tuning": (tiny_bert, lambda: PTuning(num_virtual_tokens=3, encoder_hidden_size=8),
                     lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3, encoder_hidden_size=8)),
        "prefix_tuning": (tiny_bert, lambda: PrefixTuning(num_virtual_tokens=3),
                          lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
        "loha": (tiny_bert, lambda: LoHa(r=2, alpha=4, targets=qv),
                 lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=qv)),
        "lokr": (tiny_bert, lambda: LoKr(r=2, alpha=4, targets=qv),
                 lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=qv)),
        "oft": (tiny_bert, lambda: OFT(oft_block_size=4, targets=qv),
                lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=qv)),
        "llama_adapter": (tiny_llama, lambda: LlamaAdapter(adapter_len=4, adapter_layers=2),
                          lambda: peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM")),
    }


PEFT_METHODS = sorted(name for name, cls in METHODS.items() if hasattr(cls, "to_peft"))


def _case(method: str):
    cases = _cases()
    if method not in cases:
        pytest.fail(f"method {method!r} has a PEFT equivalent (to_peft) but no case here: add one to _cases")
    return cases[method]


def _changed(adapted: torch.Tensor, bare: torch.Tensor) -> torch.Tensor:
    assert not torch.allclose(adapted, bare, atol=1e-3), "the adapter must change the outputs"
    return adapted


@needs_peft
@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peftkit_file_loads_in_peft_with_same_outputs(method: str, tmp_path: Path) -> None:
    make, config, _ = _case(method)
    base, inputs = make(), _inputs()
    fresh, bare = copy.deepcopy(base), model_output(base, inputs)
    peftkit.attach(base, config(), name="x")
    randomize(base, "x")
    expected = _changed(model_output(base, inputs), bare)
    peftkit.save(base, tmp_path, "x", format="peft")
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(model_output(theirs, inputs), expected, atol=ATOL, rtol=1e-5)


@needs_peft
@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peft_file_loads_here_with_same_outputs(method: str, tmp_path: Path) -> None:
    make, _, peft_config = _case(method)
    base, inputs = make(), _inputs()
    fresh, bare = copy.deepcopy(base), model_output(base, inputs)
    theirs = peft.get_peft_model(base, peft_config()).eval()
    _randomize_peft(theirs)
    expected = _changed(model_output(theirs, inputs), bare)
    theirs.save_pretrained(tmp_path)
    peftkit.load(fresh, tmp_path)
    torch.testing.assert_close(model_output(fresh, inputs), expected, atol=ATOL, rtol=1e-5)


@needs_peft
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_file_for_a_classifier_carries_the_base_head(method: str, tmp_path: Path) -> None:
    """PEFT's SEQ_CLS model wraps the classifier and expects its tensors (else KeyError 'base_model.classifier.weight'):
    the base head is saved, and loading it back here checks it is this model's and adds no head copy."""
    make, config, _ = _case(method)
    model = make()
    peftkit.attach(model, config())
    peftkit.save(model, tmp_path, format="peft")
    raw = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(raw["base_model.classifier.weight"], model.classifier.weight)
    fresh = tiny_bert()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".peftkit." not in f".{k}"}, strict=False)
    peftkit.load(fresh, tmp_path)
    assert peftkit.adapters(fresh)["default"].modules_to_save == []
    with torch.no_grad():
        fresh.classifier.weight[0, 0] += 1  # another head: the file's is not this model's
    with pytest.raises(peftkit.AdapterFileError, match=r"classifier\.weight .*differs"):
        peftkit.load(fresh, tmp_path, name="other")


# --- strict PEFT target rules --------------------------------------------------------------------------------------

def _peft_lora(path: Path, base: nn.Module, **kwargs: Any) -> torch.Tensor:
    """Save a randomised PEFT LoRA of `base` (a copy) to `path`; return its outputs."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{"r": 2, "lora_alpha": 4, **kwargs})).eval()
    _randomize_peft(model)
    model.save_pretrained(path)
    return model_output(model, INPUTS)


INPUTS = {"input_ids": torch.tensor([[5, 7, 9, 11, 3, 2], [4, 4, 8, 1, 9, 30]])}


def _edit_config(path: Path, **edit: Any) -> None:
    file = path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **edit}))


def _edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = path / "adapter_model.safetensors"
    tensors = safetensors.torch.load(file.read_bytes())
    change(tensors)
    safetensors.torch.save_file(tensors, str(file))


@needs_peft
@pytest.mark.parametrize("kwargs", [
    {"target_modules": ["query", "value"], "layers_to_transform": [1]},
    {"target_modules": ["query", "dense"], "layers_to_transform": 0, "layers_pattern": "layer"},
    {"target_modules": ["query", "bert.encoder.layer.0.attention.self.value"], "layers_to_transform": [1]},
    {"target_modules": r".*\.(key|value)", "exclude_modules": ["layer.0.attention.self.key"]},
    {"target_modules": ["query", "value", "q_proj"], "exclude_modules": r".*\.1\..*"},
    {"target_modules": ["dense", "classifier"], "modules_to_save": ["classifier"]},
])
def test_peft_target_rules_pick_the_same_modules(kwargs: dict, tmp_path: Path) -> None:
    base = tiny_bert()
    expected = _peft_lora(tmp_path, base, **kwargs)
    peftkit.load(base, tmp_path)
    torch.testing.assert_close(model_output(base, INPUTS), expected, atol=ATOL, rtol=1e-5)


@needs_peft
def test_all_linear_follows_pefts_rule(tmp_path: Path) -> None:
    """A hand-written "all-linear" (PEFT itself saves the expanded names): every Linear but a SEQ_CLS classifier."""
    base = tiny_bert()
    _peft_lora(tmp_path, base, target_modules="all-linear", task_type="SEQ_CLS")
    _edit_config(tmp_path, target_modules="all-linear")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    peftkit.load(base, tmp_path)
    hosts = [h for h in peftkit.adapters(base)["default"].targets]
    assert "classifier" not in hosts and "bert.pooler.dense" in hosts
    torch.testing.assert_close(model_output(base, INPUTS), model_output(theirs, INPUTS), atol=ATOL, rtol=1e-5)


@needs_peft
def test_tensors_outside_the_targets_are_named(tmp_path: Path) -> None:
    """target_modules narrowed by hand: PEFT attaches only the targets; strict names the extra module's tensors."""
    base = tiny_bert()
    _peft_lora(tmp_path, base, target_modules=["query", "value"])
    _edit_config(tmp_path, target_modules=["query"])
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with pytest.raises(peftkit.AdapterFileError, match=r"outside the adapter's targets \['bert\.encoder\.layer\.0\."
                                                       r"attention\.self\.value'"):
        peftkit.load(base, tmp_path)
    assert peftkit.adapters(base) == {}
    with pytest.warns(UserWarning, match="attention.self.value"):
        peftkit.load(base, tmp_path, strict=False)
    assert all(".value." not in k for k in base.state_dict() if ".peftkit." in k)
    torch.testing.assert_close(model_output(base, INPUTS), model_output(theirs, INPUTS), atol=ATOL, rtol=1e-5)


@needs_peft
def test_targets_matching_nothing_are_an_error_even_lenient(tmp_path: Path) -> None:
    base = tiny_bert()
    _peft_lora(tmp_path, base, target_modules=["query"])
    _edit_config(tmp_path, target_modules=["q_proj", "v_proj"])
    for strict in (True, False):
        with pytest.raises(peftkit.AdapterFileError, match=r"\['q_proj', 'v_proj'\] match no module"):
            peftkit.load(base, tmp_path, strict=strict)
    assert peftkit.adapters(base) == {}


@needs_peft
def test_targeted_module_without_tensors_is_named(tmp_path: Path) -> None:
    """PEFT warns about missing keys and keeps their fresh init (B = 0): strict=False does the same."""
    base = tiny_bert()
    _peft_lora(tmp_path, base, target_modules=["query", "value"])
    _edit_tensors(tmp_path, lambda t: [t.pop(k) for k in list(t) if "layer.1.attention.self.value" in k])
    with pytest.warns(UserWarning, match="missing adapter keys"):
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with pytest.raises(peftkit.AdapterFileError, match=r"targeted modules without any tensor \['bert\.encoder\.layer\.1"
                                                       r"\.attention\.self\.value'\]"):
        peftkit.load(base, tmp_path)
    with pytest.warns(UserWarning, match=r"missing tensors \['bert\.encoder\.layer\.1\.attention\.self\.value\.lora_A'"):
        peftkit.load(base, tmp_path, strict=False)
    torch.testing.assert_close(model_output(base, INPUTS), model_output(theirs, INPUTS), atol=ATOL, rtol=1e-5)


# --- NaN / inf, ranks --------------------------------------------------------------------------------------------

@needs_peft
@pytest.mark.parametrize("strict", [True, False])
def test_non_finite_peft_tensor_is_named(strict: bool, tmp_path: Path) -> None:
    base = tiny_bert()
    _peft_lora(tmp_path, base, target_modules=["query"])
    key = "base_model.model.bert.encoder.layer.1.attention.self.query.lora_B.weight"
    _edit_tensors(tmp_path, lambda t: t[key].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(peftkit.AdapterFileError, match=f"\\['{key}'\\] hold NaN or inf"):
        peftkit.load(base, tmp_path, strict=strict)
    assert peftkit.adapters(base) == {}


def test_non_finite_peftkit_tensor_is_named(tmp_path: Path) -> None:
    model = tiny_bert()
    peftkit.attach(model, LoRA(r=2, targets=["query"]))
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.peftkit["default"].lora_A[0, 0] = float("inf")
    peftkit.save(model, tmp_path)
    with pytest.raises(peftkit.AdapterFileError, match=r"layer\.0\.attention\.self\.query\.lora_A'\] hold NaN or inf"):
        peftkit.read_adapter(tmp_path)


def test_lora_rank_above_a_layers_size_is_named() -> None:
    model = nn.Sequential(nn.Linear(384, 384), nn.Linear(384, 4))
    with pytest.raises(ValueError, match=r"module .0.: LoRA rank 1000 exceeds min\(out, in\) = 384"):
        peftkit.attach(model, LoRA(r=1000, targets=["0"]))
    with pytest.raises(ValueError, match=r"module .1.: LoRA rank 8 exceeds min\(out, in\) = 4"):
        peftkit.attach(model, LoRA(r=8, targets=["0", "1"]))
    peftkit.attach(model, LoRA(r=8, targets=["0", "1"], rank_pattern={"1": 4}))  # fits with its own rank
    assert model[1].peftkit["default"].lora_A.shape == (4, 384)
    assert peftkit.adapters(model) and list(peftkit.adapters(model)) == ["default"]


# --- rank_pattern / alpha_pattern ----------------------------------------------------------------------------------

PATTERNS = {"rank_pattern": {"value": 4, "layer.1.attention.self.query": 1}, "alpha_pattern": {r"layer\.0\..*": 7}}


def _patterned() -> LoRA:
    return LoRA(r=2, alpha=4, targets=["query", "value"], rank_pattern=PATTERNS["rank_pattern"],
                alpha_pattern=PATTERNS["alpha_pattern"])


@needs_peft
def test_peft_rank_and_alpha_patterns_load_with_same_outputs(tmp_path: Path) -> None:
    base = tiny_bert()
    expected = _peft_lora(tmp_path, base, target_modules=["query", "value"], **PATTERNS)
    peftkit.load(base, tmp_path)
    torch.testing.assert_close(model_output(base, INPUTS), expected, atol=ATOL, rtol=1e-5)
    layer = base.bert.encoder.layer
    deltas = [layer[i].attention.self.query.peftkit["default"] for i in (0, 1)]
    assert [d.lora_A.shape[0] for d in deltas] == [2, 1] and deltas[0].scaling == 7 / 2
    assert layer[1].attention.self.value.peftkit["default"].scaling == 4 / 4


@needs_peft
def test_our_patterns_load_in_peft_and_back(tmp_path: Path) -> None:
    base = tiny_bert()
    fresh, again = copy.deepcopy(base), copy.deepcopy(base)
    peftkit.attach(base, _patterned())
    randomize(base)
    expected = model_output(base, INPUTS)
    peftkit.save(base, tmp_path / "peft", format="peft")
    peftkit.save(base, tmp_path / "own")
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    torch.testing.assert_close(model_output(theirs, INPUTS), expected, atol=ATOL, rtol=1e-5)
    peftkit.load(again, tmp_path / "own")
    assert peftkit.adapters(again)["default"] == _patterned()
    assert torch.equal(model_output(again, INPUTS), expected)


def test_patterns_whose_order_matters_are_named() -> None:
    """PEFT takes the first matching key, but files are written with sorted keys: an order-dependent choice is refused."""
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"patterns \['value', 'self\.value'\] all match module"):
        peftkit.attach(model, LoRA(r=2, targets=["value"], rank_pattern={"value": 3, "self.value": 1}))
    peftkit.attach(model, LoRA(r=2, targets=["value"], rank_pattern={"self.value": 1, "value": 3}))  # sorted: fine
    with pytest.raises(ValueError, match="valid regex"):
        LoRA(targets=["value"], rank_pattern={"(": 2})
    with pytest.raises(ValueError, match="must be positive"):
        LoRA(targets=["value"], alpha_pattern={"value": 0})


# --- bias="lora_only" / "all" --------------------------------------------------------------------------------------

@needs_peft
@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_peft_trained_biases_load_as_changes(bias: str, tmp_path: Path) -> None:
    """PEFT saves trained biases as absolute values; they load as this adapter's change, the base untouched:
    outputs equal PEFT's, rows route per adapter, merging and unmerging are exact, and saving gives PEFT's file back."""
    base = tiny_bert()
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    expected = _peft_lora(tmp_path / "peft", base, target_modules=["query", "value"], bias=bias,
                          modules_to_save=["classifier"])
    peftkit.load(base, tmp_path / "peft", name="b")
    assert all(torch.equal(base.state_dict()[k], v) for k, v in pristine.items())  # the base is never written
    torch.testing.assert_close(model_output(base, INPUTS), expected, atol=ATOL, rtol=1e-5)
    peftkit.attach(base, LoRA(r=2, targets=["key"]), name="other")
    randomize(base, "other")
    with peftkit.routed(base, ["b", None]):
        routed = model_output(base, INPUTS)
    torch.testing.assert_close(routed[0], expected[0], atol=ATOL, rtol=1e-5)
    with peftkit.disabled(base):
        torch.testing.assert_close(routed[1], model_output(base, INPUTS)[1], atol=ATOL, rtol=1e-5)
    peftkit.activate(base, "b")
    peftkit.merge(base)
    torch.testing.assert_close(model_output(base, INPUTS), expected, atol=ATOL, rtol=1e-5)
    peftkit.unmerge(base)
    assert all(torch.allclose(base.state_dict()[k], v, atol=1e-6) for k, v in pristine.items())
    peftkit.save(base, tmp_path / "ours", "b", format="peft")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["bias"] == bias
    theirs = peft.PeftModel.from_pretrained(tiny_bert_like(pristine), tmp_path / "ours").eval()
    torch.testing.assert_close(model_output(theirs, INPUTS), expected, atol=ATOL, rtol=1e-5)


def tiny_bert_like(state: dict[str, torch.Tensor]) -> nn.Module:
    model = tiny_bert()
    model.load_state_dict(state)
    return model


def test_bias_all_round_trips_in_own_format(tmp_path: Path) -> None:
    model = tiny_bert()
    fresh = copy.deepcopy(model)
    peftkit.attach(model, LoRA(r=2, targets=["query"], bias="all"))
    randomize(model)
    assert model.bert.encoder.layer[0].output.LayerNorm.peftkit["default"] is not None  # a BitFit bias change
    peftkit.save(model, tmp_path)
    peftkit.load(fresh, tmp_path)
    assert torch.equal(model_output(fresh, INPUTS), model_output(model, INPUTS))
    with pytest.raises(ValueError, match="bias"):
        LoRA(targets=["query"], bias="all", init="pissa")
