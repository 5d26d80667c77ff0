"""`peftkit train`: the README's main job, on a few articles, end to end."""
from __future__ import annotations

import peftkit
from peftkit.cli import main
from peftkit.models import load_minilm


def test_train_prints_accuracy_and_saves_a_loadable_adapter(tmp_path, capsys) -> None:
    out = tmp_path / "adapter"
    assert main(["train", "--limit", "32", "--epochs", "1", "--max-length", "32", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for expected in ("trainable parameters: 75,653", "test accuracy before:", "training time:", f"adapter saved to {out}"):
        assert expected in printed
    model, _ = load_minilm(num_labels=5)
    assert peftkit.load(model, out) == "bbc"


def test_train_bad_config_is_a_named_error(capsys) -> None:
    assert main(["train", "--r", "0", "--output", ""]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftkit: error:") and "r" in err and "greater than 0" in err
