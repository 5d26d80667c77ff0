"""Training configs: the bundled default, the example configs, and every bad input as a named error
raised before any training starts (the output directory is never created)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from peftkit.train import DEFAULT_CONFIG, DataError, TrainConfigError, config_from_mapping, load_config, run_training

from tests.train_models import local, tiny_config, write

CONFIGS = Path(__file__).parent.parent / "configs"


def test_bundled_default_is_configs_bbc_lora() -> None:
    assert load_config() == load_config(CONFIGS / "bbc-lora.yaml")
    assert load_config().to_dict() == config_from_mapping(DEFAULT_CONFIG).to_dict()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate_and_round_trip(path: Path) -> None:
    config = load_config(path)
    assert config_from_mapping(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


def test_overrides_set_dotted_keys() -> None:
    config = load_config(overrides={"schedule.grad_accum": 2, "method.r": 4, "output.dir": "elsewhere"})
    assert (config.schedule.grad_accum, config.method.r, str(config.output.dir)) == (2, 4, "elsewhere")


@pytest.mark.parametrize(("section", "value", "expected"), [
    ("method", {"method": "lorra"}, "unknown PEFT method 'lorra' (did you mean lora"),
    ("method", {"method": "lora", "rank": 4, "targets": ["query"]}, "unknown key 'rank'"),
    ("model", {"name": "minilmm"}, "unknown model 'minilmm' (did you mean 'minilm'?)"),
    ("task", "classify_text", "unknown task 'classify_text' (did you mean 'classify-text'?)"),
    ("schedule", {"epoks": 3}, "schedule: unknown key 'epoks' (did you mean 'epochs'?)"),
    ("data", {"trian": "x.jsonl"}, "data: unknown key 'trian' (did you mean 'train'?)"),
    ("optimizer", {"lr": -1}, "optimizer.lr"),
    ("output", {"save": False}, "output.save is false, but eval.restore_best"),
])
def test_bad_config_is_a_named_error_before_training(tmp_path, section, value, expected) -> None:
    with pytest.raises(TrainConfigError, match=re.escape(expected)):
        run_training(tiny_config(tmp_path, **{section: value}))
    assert not (tmp_path / "run").exists()


def test_unknown_top_level_key_suggests_the_closest(tmp_path) -> None:
    config = tiny_config(tmp_path)
    config["optimiser"] = config.pop("schedule")
    with pytest.raises(TrainConfigError, match=r"unknown key 'optimiser' \(did you mean 'optimizer'\?\)"):
        run_training(config)


def test_missing_config_file_and_bad_resume_target(tmp_path) -> None:
    with pytest.raises(TrainConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(TrainConfigError, match="nothing to resume"):
        run_training(tiny_config(tmp_path), resume=True)


@pytest.mark.parametrize(("content", "expected"), [
    (None, "does not exist"),
    ("", "is empty"),
    ("text,label\n", "empty"),
])
def test_missing_or_empty_data_file(tmp_path, content, expected) -> None:
    train = tmp_path / "train.csv"
    if content is not None:
        write(train, content)
    with pytest.raises(DataError, match=expected):
        run_training(local(tmp_path, train))
    assert not (tmp_path / "run").exists()


def test_labels_outside_the_declared_set(tmp_path) -> None:
    train = write(tmp_path / "train.jsonl", '{"text": "a", "label": "sport"}\n{"text": "b", "label": "wether"}\n')
    with pytest.raises(DataError, match=r"outside the declared set \['sport', 'weather'\] \(row 1: 'wether'\)"):
        run_training(local(tmp_path, train, labels=["sport", "weather"]))
    integer = write(tmp_path / "int.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 2}\n')
    with pytest.raises(DataError, match="row 1: 2"):
        run_training(local(tmp_path, integer, labels=["sport", "weather"]))
    assert not (tmp_path / "run").exists()


def test_eval_labels_unseen_in_training_are_rejected(tmp_path) -> None:
    train = write(tmp_path / "train.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    test = write(tmp_path / "test.jsonl", '{"text": "c", "label": "z"}\n')
    with pytest.raises(DataError, match="eval data: 1 label"):
        run_training(local(tmp_path, train, eval=str(test)))


def test_missing_column_and_wrong_bundled_set(tmp_path) -> None:
    train = write(tmp_path / "train.jsonl", '{"sentence": "a", "label": "x"}\n')
    with pytest.raises(DataError, match="no column 'text'; columns: sentence, label"):
        run_training(local(tmp_path, train))
    with pytest.raises(DataError, match="no bundled data set 'chatterbot'"):
        run_training(tiny_config(tmp_path, data={"name": "chatterbot"}))


def test_accuracy_metric_on_a_language_model_task_is_rejected(tmp_path) -> None:
    config = tiny_config(tmp_path, task="causal-lm-chat", model={"name": "tiny-llama"},
                         data={"name": "chatterbot"}, eval={"metric": "accuracy"})
    config["method"]["targets"] = ["q_proj"]
    with pytest.raises(TrainConfigError, match="has no accuracy"):
        run_training(config)
