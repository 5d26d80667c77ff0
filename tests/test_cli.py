"""`peftkit train`: the README's main job (bundled default config) on a few articles, end to end; configs,
overrides, resume and bad input through the command line."""
from __future__ import annotations

import re

import peftkit
from peftkit.cli import main
from peftkit.models import load_minilm

QUICK = ["--limit", "32", "--epochs", "1", "--max-length", "32", "--set", "data.eval_limit=64", "--no-progress"]


def test_train_prints_accuracy_and_saves_a_loadable_adapter(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for expected in ("minilm + lora(", "(32 train / 64 eval rows, 5 labels: business,", "trainable parameters: 75,653",
                     "eval accuracy before:", "(chance 0.200)", "training time:", f"adapter saved to {out / 'adapter'}"):
        assert expected in printed
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file()
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"best", "last"}
    model, _ = load_minilm(num_labels=5)
    assert peftkit.load(model, out / "adapter") == "bbc"


def test_train_from_a_config_file_with_overrides_and_resume(tmp_path, capsys) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text("task: classify-text\nmodel: {name: minilm}\n"
                      "method: {method: lora, r: 2, targets: [query]}\n"
                      "data: {name: bbc-news, train_limit: 16, eval_limit: 16, max_length: 16}\n"
                      "schedule: {epochs: 1, batch_size: 8}\n")
    out = str(tmp_path / "run")
    assert main(["train", str(config), "--output", out, "--set", "method.r=3", "--no-progress"]) == 0
    assert re.search(r"lora\(targets=\['query'\], .*\br=3,", capsys.readouterr().out)
    assert main(["train", str(config), "--output", out, "--set", "method.r=3", "--resume", "--no-progress"]) == 0
    assert "for 2 steps" in capsys.readouterr().out  # resumed at the end: nothing left to do, same result


def test_train_bad_config_is_a_named_error(tmp_path, capsys) -> None:
    assert main(["train", "--set", "method.r=0", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftkit: error: invalid training config:") and "method" in err and "greater than 0" in err
    assert main(["train", "--set", "schedule.epoks=1"]) == 2
    assert "did you mean 'epochs'?" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
