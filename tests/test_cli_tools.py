"""`peftkit inspect`, `convert`, `methods`, and one-line errors, through `peftkit.cli.main` in-process.

Each adapter here is randomised and its expected numbers are computed from the model, so a summary that reads
the wrong tensors, or a conversion that drops one, fails."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import peftkit
from peftkit import LoRA, PromptTuning
from peftkit.cli import main
from peftkit.core.config import METHODS
from peftkit.models import load_minilm

from .checks import model_output, needs_peft
from .conftest import TinyNet, randomize

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # PEFT's own noise


def _bert() -> BertForSequenceClassification:
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3))


def _numel(model: torch.nn.Module, name: str = "default") -> int:
    return sum(p.numel() for p in peftkit.adapter_parameters(model, name))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(capsys, *argv: str) -> str:
    """The command fails with exit 2 and exactly one `peftkit: error:` line, no traceback."""
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("peftkit: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


# --- inspect ------------------------------------------------------------------------------------------------------

def test_inspect_a_peftkit_directory(tmp_path, capsys) -> None:
    model = TinyNet()
    peftkit.attach(model, LoRA(r=4, alpha=8, targets=["q", "v"], modules_to_save=["head"]), name="news")
    randomize(model, "news")
    peftkit.save(model, tmp_path / "a", name="news")
    code, out, _ = _run(capsys, "inspect", str(tmp_path / "a"))
    assert code == 0
    size = sum(f.stat().st_size for f in (tmp_path / "a").iterdir())
    for expected in ("format: peftkit (peftkit_adapter.json + adapter.safetensors)", "name: news",
                     "method: lora (PEFT type LORA)", "config: r=4, alpha=8.0,", "targets: 2 modules: attn.q, attn.v",
                     "modules_to_save: head", f"trainable parameters: {_numel(model, 'news'):,}\n", "dtypes: float32",
                     f"size on disk: {size / 1024:.1f} KiB", "base model: not recorded"):
        assert expected in out
    assert "rank_pattern" not in out  # empty settings are noise


def test_inspect_json_of_a_peft_directory_counts_no_base_tensors(tmp_path, capsys) -> None:
    model = _bert()
    peftkit.attach(model, PromptTuning(num_virtual_tokens=3))
    peftkit.save(model, tmp_path / "p", format="peft")  # a SEQ_CLS prompt also carries the base classifier
    config_file = tmp_path / "p" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "tiny-bert"}))
    code, out, _ = _run(capsys, "inspect", str(tmp_path / "p"), "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "peft" and info["method"] == "prompt_tuning"
    assert info["peft_type"] == "PROMPT_TUNING" and info["config"]["num_virtual_tokens"] == 3
    assert info["trainable_parameters"] == _numel(model) == 3 * 32
    assert info["base_tensors_not_counted"] == 2  # classifier.weight, classifier.bias
    assert info["base_model"] == "tiny-bert" and info["dtypes"] == ["float32"]


def test_inspect_a_peft_lora_lists_its_modules(tmp_path, capsys) -> None:
    model = _bert()
    peftkit.attach(model, LoRA(r=2, targets=["query", "value"]))
    peftkit.save(model, tmp_path / "p", format="peft")
    info = json.loads(_run(capsys, "inspect", str(tmp_path / "p"), "--json")[1])
    assert info["targets"]["count"] == 4 and info["targets"]["names"][0] == "bert.encoder.layer.0.attention.self.query"
    assert info["trainable_parameters"] == _numel(model) and info["config"]["r"] == 2


# --- errors as one line -------------------------------------------------------------------------------------------

def test_inspect_errors_are_one_line_with_exit_2(tmp_path, capsys) -> None:
    assert "does not exist" in _one_line_error(capsys, "inspect", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "holds no adapter" in _one_line_error(capsys, "inspect", str(tmp_path / "empty"))
    model = TinyNet()
    peftkit.attach(model, LoRA(targets=["q"]))
    peftkit.save(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    assert "not a readable safetensors file" in _one_line_error(capsys, "inspect", str(tmp_path / "a"))


def test_a_bad_config_field_is_one_line_without_pydantic_url(tmp_path, capsys) -> None:
    model = TinyNet()
    peftkit.attach(model, LoRA(targets=["q"]))
    peftkit.save(model, tmp_path / "a")
    meta_file = tmp_path / "a" / "peftkit_adapter.json"
    meta = json.loads(meta_file.read_text())
    meta["config"].update(r=0, dropout=2)
    meta_file.write_text(json.dumps(meta))
    err = _one_line_error(capsys, "inspect", str(tmp_path / "a"))
    assert "invalid lora config: r: Input should be greater than 0; dropout: Input should be less than 1" in err
    assert "https://" not in err


def test_debug_reraises_and_bugs_stay_tracebacks(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PEFTKIT_DEBUG", "1")
    with pytest.raises(peftkit.AdapterFileError, match="holds no adapter"):
        main(["inspect", str(tmp_path / "empty")])
    monkeypatch.delenv("PEFTKIT_DEBUG")

    def bug(path: Path) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("peftkit.cli_tools.adapter_summary", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["inspect", str(tmp_path / "empty")])


# --- methods ------------------------------------------------------------------------------------------------------

def test_methods_lists_every_method_with_fields_and_defaults(capsys) -> None:
    code, out, _ = _run(capsys, "methods")
    assert code == 0 and len(METHODS) > 20
    names = {line.partition(":")[0] for line in out.splitlines() if line and not line.startswith(" ")}
    assert set(METHODS) <= names
    assert "lora: LoRA config: rank, scaling" in out and "    r=8, alpha=8.0, dropout=0.0" in out
    code, out, _ = _run(capsys, "methods", "lora")
    assert code == 0 and "Hugging Face PEFT type LORA" in out
    assert any(line.split() == ["r", "default", "8:", "rank", "of", "ΔW"] for line in out.splitlines())
    assert "did you mean lora" in _one_line_error(capsys, "methods", "lroa")


def test_train_help_points_to_methods(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0 and "`peftkit methods`" in capsys.readouterr().out


# --- convert ------------------------------------------------------------------------------------------------------

def test_convert_refuses_to_replace_a_directory_that_is_no_adapter(tmp_path, capsys) -> None:
    model = TinyNet()
    peftkit.attach(model, LoRA(targets=["q"]))
    peftkit.save(model, tmp_path / "a")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    err = _one_line_error(capsys, "convert", str(tmp_path / "a"), "--to", "peft", "--output", str(tmp_path / "out"),
                          "--model", "minilm")
    assert "is not an adapter directory" in err and (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert "unknown model 'minilml' (did you mean minilm?)" in _one_line_error(
        capsys, "convert", str(tmp_path / "a"), "--to", "peft", "--output", str(tmp_path / "o2"), "--model", "minilml")


@needs_peft
def test_convert_round_trip_on_minilm(tmp_path, capsys) -> None:
    from peft import PeftModel

    model, tokenizer = load_minilm()
    peftkit.attach(model, LoRA(r=4, alpha=8, targets=["query", "value"]), name="news")
    randomize(model, "news")
    inputs = dict(tokenizer(["a short sentence", "another one, longer than the first"], padding=True,
                            return_tensors="pt"))
    expected = model_output(model, inputs).last_hidden_state
    with peftkit.disabled(model):
        assert not torch.allclose(model_output(model, inputs).last_hidden_state, expected, atol=1e-4)
    peftkit.save(model, tmp_path / "ours", name="news")

    assert main(["convert", str(tmp_path / "ours"), "--to", "peft", "--output", str(tmp_path / "peft"),
                 "--model", "minilm"]) == 0
    assert "-> " in capsys.readouterr().out
    theirs = PeftModel.from_pretrained(load_minilm()[0], str(tmp_path / "peft")).eval()
    torch.testing.assert_close(model_output(theirs, inputs).last_hidden_state, expected, rtol=1e-5, atol=1e-5)

    assert main(["convert", str(tmp_path / "peft"), "--to", "peftkit", "--output", str(tmp_path / "back"),
                 "--model", "minilm"]) == 0
    fresh = load_minilm()[0]
    peftkit.load(fresh, tmp_path / "back")
    torch.testing.assert_close(model_output(fresh, inputs).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
