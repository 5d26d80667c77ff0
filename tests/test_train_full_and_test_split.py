"""`method: full` (every base parameter trained, saved whole, restored exactly), switching method with overrides,
bottleneck presets in YAML, and the last / best epoch and the separate `data.test` split of a run's results."""
from __future__ import annotations

import json
import re

import pytest
import torch

from peftkit.train import DataError, TrainConfigError, config_from_mapping, run_training
from peftkit.train.full import FullFinetune, is_full, load_full

from tests.train_models import local, tiny_bert, tiny_config, write

CSV = "text,label\n" + "".join(f"{'good fine great' if i % 2 else 'bad awful poor'} {i},{'pos' if i % 2 else 'neg'}\n"
                               for i in range(24))


# --- configs ----------------------------------------------------------------------------------------------------

def test_switching_method_drops_the_old_methods_keys_with_a_warning(tmp_path) -> None:
    config = tiny_config(tmp_path, method={"method": "lora", "r": 2, "alpha": 4, "targets": ["query", "value"]})
    with pytest.warns(UserWarning, match=r"method lora -> ia3: dropped r, alpha \(ia3 has no such keys\)"):
        switched = config_from_mapping(config, {"method.method": "ia3", "method.feedforward": ["value"]})
    assert switched.method.to_dict() == {"method": "ia3", "targets": ["query", "value"], "exclude": None,
                                         "modules_to_save": [], "feedforward": ["value"]}
    with pytest.warns(UserWarning, match=r"dropped r, alpha, targets"):
        assert config_from_mapping(config, {"method.method": "full"}).method == FullFinetune()


def test_every_unknown_method_key_is_named_at_once(tmp_path) -> None:
    bad = {"method": "lora", "rank": 4, "alfa": 2, "targets": ["query"]}
    with pytest.raises(TrainConfigError, match=re.escape("lora: unknown keys 'rank' (did you mean 'rank_pattern'?), "
                                                         "'alfa' (did you mean 'alpha'?); valid keys: targets")):
        config_from_mapping(tiny_config(tmp_path, method=bad))
    with pytest.raises(TrainConfigError, match=re.escape("full: unknown key 'r'; it takes no other keys")):
        config_from_mapping(tiny_config(tmp_path, method={"method": "full", "r": 2}))
    with pytest.raises(TrainConfigError, match=re.escape("unknown PEFT method 'fulll' (did you mean full")):
        config_from_mapping(tiny_config(tmp_path, method={"method": "fulll"}))


def test_bottleneck_preset_in_a_config_with_explicit_keys_overriding(tmp_path) -> None:
    from peftkit.methods.additive.bottleneck import PRESETS

    config = config_from_mapping(tiny_config(tmp_path, method={"method": "bottleneck", "preset": "parallel",
                                                               "bottleneck": 4, "scale": 2.0}))
    method = config.method.to_dict()
    assert (method["placement"], method["scale"], method["bottleneck"]) == ("parallel", 2.0, 4)
    assert method["targets"] == PRESETS["parallel"]["targets"] and "preset" not in method  # saved expanded
    result = run_training(config)
    hosts = sorted(name for name, p in result.model.named_parameters() if p.requires_grad and "up.weight" in name)
    assert len(hosts) == 2 and all(".output.dense" in name and "attention" not in name for name in hosts)
    with pytest.raises(TrainConfigError, match="unknown bottleneck adapter preset 'adapterdrop'; choose one of"):
        config_from_mapping(tiny_config(tmp_path, method={"method": "bottleneck", "preset": "adapterdrop"}))


# --- full fine-tuning -------------------------------------------------------------------------------------------

def test_full_finetune_trains_every_parameter_and_saves_the_chosen_epoch(tmp_path) -> None:
    config = tiny_config(tmp_path, method={"method": "full"}, schedule={"epochs": 3},
                         optimizer={"lr": 0.05})  # a large step: epochs differ, so the best one is not the last
    result = run_training(config)
    saved = result.adapter_dir
    assert is_full(saved) and not (saved / "peftkit_adapter.json").exists()
    fresh, _ = tiny_bert(5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    load_full(fresh, saved)
    state = result.model.state_dict()
    assert all(torch.equal(value.cpu(), state[key].cpu()) for key, value in fresh.state_dict().items())
    changed = [key for key, value in fresh.state_dict().items() if not torch.equal(value, before[key])]
    assert "bert.embeddings.word_embeddings.weight" in changed and "classifier.weight" in changed
    assert result.best["step"] < result.last["step"] and result.after != result.last["metrics"]
    assert result.after == result.best["metrics"]  # restored from checkpoints/best's full weights, then saved


def test_a_full_finetune_of_another_shape_is_refused(tmp_path) -> None:
    result = run_training(tiny_config(tmp_path, method={"method": "full"}))
    other, _ = tiny_bert(3)  # 3 labels: the classifier does not fit
    with pytest.raises(ValueError, match=r"classifier.weight has shape \[5, 16\], the model's is \[3, 16\]"):
        load_full(other, result.adapter_dir)


# --- last, best and test ----------------------------------------------------------------------------------------

def test_the_test_split_is_scored_once_with_the_chosen_weights(tmp_path) -> None:
    data = write(tmp_path / "data.csv", CSV)
    config = local(tmp_path, data, eval=str(data), test=str(data))
    config["schedule"] = {"epochs": 3, "batch_size": 8}
    result = run_training(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in records if r["kind"] == "test"]
    assert len(tests) == 1 and tests[0]["step"] == result.best["step"] and tests[0]["epoch"] == result.best["epoch"]
    assert result.test == {k: tests[0][k] for k in ("loss", "accuracy")}
    assert result.test == result.after  # the test file is the eval file here: the same weights give the same score
    evals = [r for r in records if r["kind"] == "eval"]
    assert result.last == {"step": evals[-1]["step"], "epoch": 3, "metrics": {k: evals[-1][k] for k in ("loss", "accuracy")}}


def test_a_bad_test_file_is_a_named_error_before_training(tmp_path) -> None:
    data = write(tmp_path / "data.csv", CSV)
    outside = write(tmp_path / "test.csv", "text,label\nsomething,maybe\n")
    with pytest.raises(DataError, match=r"test data: 1 label\(s\) outside the declared set \['neg', 'pos'\]"):
        run_training(local(tmp_path, data, test=str(outside)))
    with pytest.raises(DataError, match="data file .*missing.csv does not exist"):
        run_training(local(tmp_path, data, test=str(tmp_path / "missing.csv")))
    assert not (tmp_path / "run").exists()
