"""Interop with the real Hugging Face `peft` package, output for output, plus the file-safety guarantees.

Every interop test makes the adapter non-trivial (random B factors and head copies) and
asserts it changes the outputs first, so an adapter silently dropped on load cannot pass.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

try:  # only the tests marked needs_peft use these
    from peft import LoraConfig, PeftModel, get_peft_model
except ImportError:
    LoraConfig = PeftModel = get_peft_model = None
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import peftkit  # noqa: E402
from peftkit import LoRA  # noqa: E402

from .checks import model_output, needs_peft

from .conftest import randomize  # noqa: E402

ATOL = 1e-5
pytestmark = [  # PEFT's own noise
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`"),
]
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- tiny random models and their inputs -------------------------------------------------------------------------

def _bert(hidden: int = 32) -> nn.Module:
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3))


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def _llama() -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


class ConvNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, 100, (3, 7))}


def _bert_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 100, (3, 7))
    mask = torch.ones_like(ids)
    ids[0, 5:], mask[0, 5:] = 0, 0  # padding (token 0 is the embedding's padding_idx) must not matter
    return {"input_ids": ids, "attention_mask": mask}


def _image() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


Case = tuple[Callable[[], nn.Module], dict[str, Any], Callable[[], Any]]
CASES: dict[str, Case] = {
    "bert-seqcls-head": (_bert, {"target_modules": ["query", "value"], "modules_to_save": ["classifier"],
                                 "task_type": "SEQ_CLS"}, _bert_inputs),
    "bert-embedding": (_bert, {"target_modules": ["word_embeddings", "query"]}, _bert_inputs),
    "bert-regex": (_bert, {"target_modules": r".*\.attention\.(self\.key|output\.dense)"}, _bert_inputs),
    "bert-rslora": (_bert, {"target_modules": ["query", "value", "dense"], "use_rslora": True, "r": 4,
                            "lora_alpha": 13}, _bert_inputs),
    # PEFT accepts list entries that match nothing and excludes by suffix or regex
    "bert-lax-list-exclude": (_bert, {"target_modules": ["query", "value", "q_proj"],
                                      "exclude_modules": ["layer.0.attention.self.query", "v_proj"]}, _bert_inputs),
    "bert-regex-exclude": (_bert, {"target_modules": r".*\.(query|key|value)", "exclude_modules": r".*\.1\..*"},
                           _bert_inputs),
    # wte is tied to lm_head: its LoRA must act on lookups only, as in PEFT
    "gpt2-conv1d-embedding": (_gpt2, {"target_modules": ["c_attn", "c_proj", "wte"], "fan_in_fan_out": True,
                                      "task_type": "CAUSAL_LM"}, _ids),
    "llama-named": (_llama, {"target_modules": LLAMA_LINEAR, "task_type": "CAUSAL_LM"}, _ids),
    "llama-all-linear": (_llama, {"target_modules": "all-linear", "r": 2, "lora_alpha": 5}, _ids),
    "sequential-conv2d": (ConvNet, {"target_modules": ["0", "3"]}, _image),
}


def _randomize_peft(model: nn.Module) -> None:
    """Non-zero values for every PEFT LoRA factor and trainable head copy."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:
                p.copy_(torch.randn_like(p) * 0.3)


def _peft_lora(**kwargs: Any) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, **kwargs})


def _save_peft_adapter(make: Callable[[], nn.Module], kwargs: dict[str, Any], path: Path) -> nn.Module:
    """Save a randomised PEFT adapter to `path`; return a fresh copy of its base."""
    base = make().eval()
    fresh = copy.deepcopy(base)
    model = get_peft_model(base, _peft_lora(**kwargs))
    _randomize_peft(model)
    model.save_pretrained(path)
    return fresh


def _read(file: Path) -> dict[str, torch.Tensor]:
    """Tensors in memory (not mapped: the tests rewrite files they read)."""
    return safetensors.torch.load(file.read_bytes())


def _state_keys(model: nn.Module) -> set[str]:
    return set(model.state_dict())


# --- 1. PEFT -> peftkit ------------------------------------------------------------------------------------------

@needs_peft
@needs_peft
@needs_peft
@needs_peft
@needs_peft
@needs_peft
@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_with_same_outputs(case: str, tmp_path: Path) -> None:
    make, kwargs, make_inputs = CASES[case]
    base = make().eval()
    fresh = copy.deepcopy(base)
    inputs = make_inputs()
    bare = model_output(base, inputs)
    model = get_peft_model(base, _peft_lora(**kwargs)).eval()
    _randomize_peft(model)
    expected = model_output(model, inputs)
    assert not torch.allclose(expected, bare, atol=1e-3), "the PEFT adapter must change the outputs"
    model.save_pretrained(tmp_path)

    name = peftkit.load(fresh, tmp_path)
    assert name == "default" and peftkit.active_adapters(fresh) == ["default"]
    torch.testing.assert_close(model_output(fresh, inputs), expected, atol=ATOL, rtol=1e-5)
    with peftkit.disabled(fresh):
        torch.testing.assert_close(model_output(fresh, inputs), bare, atol=ATOL, rtol=1e-5)


@needs_peft
@needs_peft
def test_peft_adapter_factors_land_unchanged(tmp_path: Path) -> None:
    """Tensor for tensor: PEFT's lora_A.weight / lora_embedding_B / head copy are ours, bit for bit."""
    fresh = _save_peft_adapter(_bert, {"target_modules": ["word_embeddings", "query"],
                                       "modules_to_save": ["classifier"]}, tmp_path)
    raw = _read(tmp_path / "adapter_model.safetensors")
    peftkit.load(fresh, tmp_path, name="x")
    ours = fresh.state_dict()
    p = "base_model.model."
    pairs = {
        "bert.embeddings.word_embeddings.peftkit.x.lora_A": "bert.embeddings.word_embeddings.lora_embedding_A",
        "bert.embeddings.word_embeddings.peftkit.x.lora_B": "bert.embeddings.word_embeddings.lora_embedding_B",
        "bert.encoder.layer.1.attention.self.query.peftkit.x.lora_A": "bert.encoder.layer.1.attention.self.query.lora_A.weight",
        "classifier.peftkit.x.module.weight": "classifier.weight",
    }
    for key, peft_key in pairs.items():
        assert torch.equal(ours[key], raw[p + peft_key]), key
    config = peftkit.adapters(fresh)["x"]
    assert config.r == 4 and config.alpha == 8 and config.modules_to_save == ["classifier"]


@needs_peft
@needs_peft
def test_two_peft_adapters_route_per_row(tmp_path: Path) -> None:
    """Two PEFT adapters on one base, routed per row: each row equals its own PEFT model's output."""
    pristine = _llama().eval()
    base = copy.deepcopy(pristine)
    inputs = _ids()
    expected = {None: model_output(pristine, inputs)}
    for name, targets in (("a", ["q_proj", "v_proj"]), ("b", ["up_proj", "down_proj", "embed_tokens"])):
        model = get_peft_model(copy.deepcopy(pristine), _peft_lora(target_modules=targets)).eval()
        _randomize_peft(model)
        expected[name] = model_output(model, inputs)
        model.save_pretrained(tmp_path / name)
        peftkit.load(base, tmp_path / name, name=name)
    rows = ["b", None, "a"]
    with peftkit.routed(base, rows):
        out = model_output(base, inputs)
    for i, name in enumerate(rows):
        torch.testing.assert_close(out[i], expected[name][i], atol=ATOL, rtol=1e-5)
    peftkit.activate(base, ["a", "b"])  # both active add up, as two PEFT adapters would
    assert not torch.allclose(model_output(base, inputs), expected["a"], atol=1e-3)


# --- 2. peftkit -> PEFT ------------------------------------------------------------------------------------------

OURS: dict[str, tuple[Callable[[], nn.Module], LoRA, Callable[[], Any]]] = {
    "bert-seqcls-head": (_bert, LoRA(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"]),
                         _bert_inputs),
    "bert-embedding": (_bert, LoRA(r=4, alpha=8, targets=["word_embeddings", "query"]), _bert_inputs),
    "bert-regex-exclude": (_bert, LoRA(r=3, alpha=6, targets=r".*\.(query|key|value)", exclude=r".*\.0\..*"),
                           _bert_inputs),
    "bert-suffix-list-exclude": (_bert, LoRA(r=4, alpha=8, targets=["attention.self.query", "value", "word_embeddings"],
                                             exclude=["layer.0.attention.self.query"]), _bert_inputs),
    "bert-rslora": (_bert, LoRA(r=4, alpha=13, rslora=True, targets=["query", "value", "dense"]), _bert_inputs),
    "bert-all-linear": (_bert, LoRA(r=2, alpha=4, targets="all-linear", init="gaussian"), _bert_inputs),
    "gpt2-conv1d-embedding": (_gpt2, LoRA(r=4, alpha=8, targets=["c_attn", "c_proj", "wte"]), _ids),
    "llama-all-linear": (_llama, LoRA(r=2, alpha=5, targets="all-linear"), _ids),
    "llama-pissa": (_llama, LoRA(r=2, alpha=4, targets=["q_proj", "o_proj"], init="pissa"), _ids),
    "sequential-conv2d": (ConvNet, LoRA(r=2, alpha=4, targets=["0", "3"]), _image),
}


@needs_peft
@pytest.mark.parametrize("case", OURS)
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case: str, tmp_path: Path) -> None:
    make, config, make_inputs = OURS[case]
    base = make().eval()
    fresh = copy.deepcopy(base)
    inputs = make_inputs()
    bare = model_output(base, inputs)
    peftkit.attach(base, config, name="x")
    randomize(base, "x")
    expected = model_output(base, inputs)
    assert not torch.allclose(expected, bare, atol=1e-3), "the adapter must change the outputs"
    peftkit.save(base, tmp_path, "x", format="peft")

    model = PeftModel.from_pretrained(fresh, tmp_path).eval()
    atol = 1e-4 if config.init == "pissa" else ATOL  # PiSSA is saved as s·[B, −B0][A; A0]: float rounding differs
    torch.testing.assert_close(model_output(model, inputs), expected, atol=atol, rtol=1e-5)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_rslora"] == config.rslora


def test_gpt2_conv1d_is_saved_with_fan_in_fan_out(tmp_path: Path) -> None:
    """PEFT needs fan_in_fan_out=True on GPT-2's Conv1D (it warns and patches it otherwise)."""
    model = _gpt2()
    peftkit.attach(model, LoRA(targets=["c_attn"]))
    peftkit.save(model, tmp_path, format="peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_all_linear_is_saved_as_the_module_names_it_chose(tmp_path: Path) -> None:
    """PEFT expands 'all-linear' with its own heuristics; writing our choice keeps both on the same modules."""
    model = _bert()
    peftkit.attach(model, LoRA(r=2, targets="all-linear"))  # r <= 3: the classifier has 3 outputs
    peftkit.save(model, tmp_path, format="peft")
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert targets == [n for n, m in _bert().named_modules() if isinstance(m, nn.Linear)]


def test_peft_round_trip_back_into_peftkit(tmp_path: Path) -> None:
    """peftkit -> PEFT file -> peftkit is exact, tensors and outputs."""
    make, config, make_inputs = OURS["bert-seqcls-head"]
    base = make().eval()
    fresh = copy.deepcopy(base)
    peftkit.attach(base, config, name="x")
    randomize(base)
    peftkit.save(base, tmp_path, "x", format="peft")
    peftkit.load(fresh, tmp_path, name="x")
    inputs = make_inputs()
    assert torch.equal(model_output(fresh, inputs), model_output(base, inputs))
    theirs, ours = base.state_dict(), fresh.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


# --- 3. peftkit's own format -------------------------------------------------------------------------------------

def test_own_format_round_trip_is_exact(tmp_path: Path) -> None:
    base = _bert().eval()
    fresh = copy.deepcopy(base)
    config = LoRA(r=4, alpha=6, rslora=True, targets=["word_embeddings", "query", "value"], modules_to_save=["classifier"])
    peftkit.attach(base, config, name="mine")
    randomize(base)
    path = peftkit.save(base, tmp_path / "mine", "mine")
    assert sorted(os.listdir(path)) == ["adapter.safetensors", "peftkit_adapter.json"]
    assert peftkit.load(fresh, path) == "mine"
    assert peftkit.adapters(fresh) == {"mine": config}
    inputs = _bert_inputs()
    assert torch.equal(model_output(fresh, inputs), model_output(base, inputs))
    theirs, ours = base.state_dict(), fresh.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_own_format_conv_and_several_adapters(tmp_path: Path) -> None:
    base = ConvNet().eval()
    fresh = copy.deepcopy(base)
    for name, r in (("a", 2), ("b", 3)):
        peftkit.attach(base, LoRA(r=r, targets=["0", "3"]), name=name)
        randomize(base, name)
        peftkit.save(base, tmp_path / name, name)
        peftkit.load(fresh, tmp_path / name)
    x = _image()
    for name in ("a", "b"):
        peftkit.activate(base, name)
        peftkit.activate(fresh, name)
        assert torch.equal(model_output(fresh, x), model_output(base, x))


# --- 4. PEFT options we cannot honour ----------------------------------------------------------------------------

@needs_peft
@pytest.mark.parametrize(("kwargs", "option"), [
    ({"lora_bias": True}, "lora_bias"),
    ({"use_dora": True, "bias": "lora_only"}, "bias"),
])
def test_unsupported_peft_option_is_a_named_error(kwargs: dict, option: str, tmp_path: Path) -> None:
    fresh = _save_peft_adapter(_bert, {"target_modules": ["query", "value"], **kwargs}, tmp_path)
    keys = _state_keys(fresh)
    with pytest.raises(peftkit.AdapterFileError, match=option):
        peftkit.load(fresh, tmp_path)
    assert _state_keys(fresh) == keys


@needs_peft
@pytest.mark.parametrize(("edit", "message"), [
    ({"init_lora_weights": "pissa"}, "pissa"),
    ({"peft_type": "IA3"}, r"missing tensors \['bert\.encoder\.layer\.0\.attention\.self\.query\.ia3_l'"),
    ({"r": None}, "r"),
    ({"peft_type": ["LORA"]}, "LORA"),
])
def test_unsupported_peft_config_values_are_named_errors(edit: dict, message: str, tmp_path: Path) -> None:
    fresh = _save_peft_adapter(_bert, {"target_modules": ["query"]}, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **edit}))
    with pytest.raises(peftkit.AdapterFileError, match=message):
        peftkit.load(fresh, tmp_path)


@needs_peft
@needs_peft
def test_peft_config_missing_a_required_field_is_a_named_error(tmp_path: Path) -> None:
    fresh = _save_peft_adapter(_bert, {"target_modules": ["query"]}, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["r"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(peftkit.AdapterFileError, match="'r'"):
        peftkit.load(fresh, tmp_path)


@needs_peft
@needs_peft
def test_peft_file_with_foreign_tensors_is_a_named_error(tmp_path: Path) -> None:
    fresh = _save_peft_adapter(_bert, {"target_modules": ["query"]}, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    safetensors.torch.save_file({**_read(weights), "base_model.model.bert.encoder.extra.weight": torch.zeros(2)}, str(weights))
    with pytest.raises(peftkit.AdapterFileError, match=r"\['bert\.encoder\.extra\.weight'\] are neither"):
        peftkit.load(fresh, tmp_path)
    assert list(peftkit.adapters(fresh)) == []


@needs_peft
@needs_peft
def test_peft_saved_embedding_base_weights_are_checked_not_loaded(tmp_path: Path) -> None:
    """PEFT saves a targeted embedding's base weight beside the adapter: fine when it is this base's, else an error."""
    fresh = _save_peft_adapter(_llama, {"target_modules": ["embed_tokens", "q_proj"]}, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    assert "base_model.model.model.embed_tokens.base_layer.weight" in _read(weights)
    other = copy.deepcopy(fresh)
    peftkit.load(fresh, tmp_path)
    with torch.no_grad():
        other.model.embed_tokens.weight[3] += 1  # a different (e.g. further trained) base
    with pytest.raises(peftkit.AdapterFileError, match=r"model\.embed_tokens\.weight .*differs"):
        peftkit.load(other, tmp_path)
    other.resize_token_embeddings(120)  # PEFT saves resized embeddings too; their shape must then fit
    with pytest.raises(peftkit.AdapterFileError, match=r"embed_tokens\.lora_A has shape \(4, 100\).*\(4, 120\)"):
        peftkit.load(other, tmp_path)
    assert list(peftkit.adapters(other)) == []


def test_hand_edited_pissa_config_is_refused(tmp_path: Path) -> None:
    model = ConvNet()
    peftkit.attach(model, LoRA(r=4, targets=["3"]))
    peftkit.save(model, tmp_path)
    meta = json.loads((tmp_path / "peftkit_adapter.json").read_text())
    meta["config"]["init"] = "pissa"
    (tmp_path / "peftkit_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(peftkit.AdapterFileError, match="PiSSA"):
        peftkit.load(ConvNet(), tmp_path)


# --- 5. bad files: named errors, nothing left attached -----------------------------------------------------------

@pytest.fixture
def saved_peft(tmp_path: Path) -> tuple[nn.Module, Path]:
    """A valid PEFT adapter directory and a fresh base that already holds one peftkit adapter ('keep')."""
    path = tmp_path / "adapter"
    fresh = _save_peft_adapter(_bert, {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}, path)
    peftkit.attach(fresh, LoRA(targets=["key"]), name="keep")
    randomize(fresh, "keep")
    return fresh.eval(), path


def _assert_untouched(model: nn.Module, keys: set[str], before: torch.Tensor, inputs: Any) -> None:
    assert list(peftkit.adapters(model)) == ["keep"] and peftkit.active_adapters(model) == ["keep"]
    assert _state_keys(model) == keys
    assert torch.equal(model_output(model, inputs), before)


def _truncate(path: Path) -> None:
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _random_bytes(path: Path) -> None:
    (path / "adapter_model.safetensors").write_bytes(os.urandom(4096))


def _pickle(path: Path) -> None:
    weights = path / "adapter_model.safetensors"
    torch.save(_read(weights), weights)


def _empty_file(path: Path) -> None:
    (path / "adapter_model.safetensors").write_bytes(b"")


def _no_weights(path: Path) -> None:
    (path / "adapter_model.safetensors").unlink()


def _no_config(path: Path) -> None:
    (path / "adapter_config.json").unlink()


def _bad_json(path: Path) -> None:
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')


def _json_list(path: Path) -> None:
    (path / "adapter_config.json").write_text("[1, 2]")


def _pickle_only(path: Path) -> None:
    weights = path / "adapter_model.safetensors"
    torch.save(_read(weights), path / "adapter_model.bin")
    weights.unlink()


def _wrong_rank(path: Path) -> None:
    config_file = path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "r": 8}))


def _wrong_dtype(path: Path) -> None:
    weights = path / "adapter_model.safetensors"
    safetensors.torch.save_file({k: v.to(torch.int64) for k, v in _read(weights).items()}, str(weights))


@needs_peft
@pytest.mark.parametrize(("corrupt", "message"), [
    (_truncate, "safetensors"),
    (_random_bytes, "safetensors"),
    (_pickle, "safetensors"),
    (_empty_file, "safetensors"),
    (_no_weights, "does not exist"),
    (_pickle_only, "adapter_model.bin is a pickle"),
    (_no_config, "holds no adapter"),
    (_bad_json, "not valid JSON"),
    (_json_list, "JSON object"),
    (_wrong_rank, r"lora_A has shape \(4, 32\) in the file but \(8, 32\)"),
    (_wrong_dtype, "dtype"),
])
def test_bad_adapter_files_are_named_errors_and_leave_model_untouched(
        saved_peft: tuple[nn.Module, Path], corrupt: Callable[[Path], None], message: str) -> None:
    model, path = saved_peft
    inputs = _bert_inputs()
    keys, before = _state_keys(model), model_output(model, inputs)
    corrupt(path)
    with pytest.raises(peftkit.AdapterFileError, match=message):
        peftkit.load(model, path)
    _assert_untouched(model, keys, before, inputs)


@needs_peft
@needs_peft
def test_missing_directory_is_a_named_error(saved_peft: tuple[nn.Module, Path], tmp_path: Path) -> None:
    model, _ = saved_peft
    with pytest.raises(peftkit.AdapterFileError, match="holds no adapter"):
        peftkit.load(model, tmp_path / "nowhere")


@pytest.mark.parametrize("fmt", ["peft", "peftkit"])
def test_adapter_from_other_shaped_base_names_tensor_and_shapes(fmt: str, tmp_path: Path) -> None:
    small = _bert(hidden=32)
    peftkit.attach(small, LoRA(r=4, targets=["query", "value"], modules_to_save=["classifier"]))
    peftkit.save(small, tmp_path, format=fmt)
    big = _bert(hidden=48)
    peftkit.attach(big, LoRA(targets=["key"]), name="keep")
    inputs = _bert_inputs()
    keys, before = _state_keys(big), model_output(big.eval(), inputs)
    with pytest.raises(peftkit.AdapterFileError, match=r"query\.lora_A.*\(4, 32\).*\(4, 48\)"):
        peftkit.load(big, tmp_path)
    _assert_untouched(big, keys, before, inputs)


@needs_peft
@needs_peft
def test_adapter_missing_a_tensor_names_it(saved_peft: tuple[nn.Module, Path]) -> None:
    model, path = saved_peft
    inputs = _bert_inputs()
    keys, before = _state_keys(model), model_output(model, inputs)
    weights = path / "adapter_model.safetensors"
    tensors = _read(weights)
    del tensors["base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"]
    safetensors.torch.save_file(tensors, str(weights))
    with pytest.raises(peftkit.AdapterFileError, match=r"missing tensors \['bert\.encoder\.layer\.1\.attention\.self\.value\.lora_B'\]"):
        peftkit.load(model, path)
    _assert_untouched(model, keys, before, inputs)


@needs_peft
@needs_peft
def test_name_clash_on_load_keeps_existing_adapter(saved_peft: tuple[nn.Module, Path]) -> None:
    model, path = saved_peft
    inputs = _bert_inputs()
    keys, before = _state_keys(model), model_output(model, inputs)
    with pytest.raises(ValueError, match="already attached"):
        peftkit.load(model, path, name="keep")
    _assert_untouched(model, keys, before, inputs)


# --- 6. saving (crash safety: test_atomic_save.py) ----------------------------------------------------------

def test_unknown_format_is_rejected_before_writing(tmp_path: Path) -> None:
    model = ConvNet()
    peftkit.attach(model, LoRA(r=4, targets=["3"]))
    with pytest.raises(ValueError, match="unknown adapter format"):
        peftkit.save(model, tmp_path / "adapter", format="gguf")
    assert os.listdir(tmp_path) == []
