"""`peftkit bench` end to end through the command line: the README's main job (`--quick`, MiniLM + BBC News) on
a cut budget, its report, JSON and plots checked; and each bench option (--task-file, --seeds, --metric,
--compare-peft, --budget) changes what it names, on the tiny BERT task."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from peftkit.bench import BENCH_METHODS
from peftkit.bench.methods import REFERENCES
from peftkit.cli import main

from .bench_tiny import write_task
from .test_bench import _Tables, _table

# --quick's cells, one fresh process each, at 32 tokens instead of 64 (each step costs about half). The steps stay
# at 30: at 12 steps every row was still at chance (0.23-0.25, probe 0.23), so the probe could not be told apart.
CUT = {"max_length": 32}
QUICK_METHODS = [name for name, entry in BENCH_METHODS.items() if entry.quick]


def _results(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench-quick")
    budget = [word for key, value in CUT.items() for word in ("--budget", f"{key}={value}")]
    done = subprocess.run([sys.executable, "-m", "peftkit", "bench", "--quick", *budget, "--output", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_quick_bench_reports_every_row_with_finite_numbers(quick) -> None:
    out, printed = quick
    [task] = _results(out)["tasks"]
    assert task["name"] == "bbc-news" and "max length 32" in task["budget"] and "image size" not in task["budget"]
    assert "--budget max_length=32" in printed  # the report's command reproduces the run
    rows = task["rows"]
    assert [row["method"] for row in rows] == QUICK_METHODS and set(REFERENCES) <= set(QUICK_METHODS)
    for row in rows:
        assert row["status"] == "ok", row
        numbers = [*row["scores"]["accuracy"], *row["scores"]["loss"], row["samples_per_s"], row["unmerged"],
                   *([row["merged"]] if row["merged"] is not None else [])]
        assert len(row["scores"]["accuracy"]) == 1 and all(math.isfinite(x) and x > 0 for x in numbers), row
        assert 0 < row["trainable"] <= row["total"] and row["saved_bytes"] > 0 and row["peak_bytes"] > 0, row
    table = _table((out / "report.md").read_text(), "bbc-news")
    assert [line[0] for line in table[1:]] == QUICK_METHODS
    assert not any(cell.startswith(("skipped", "failed")) for line in table[1:] for cell in line)
    parser = _Tables()
    parser.feed((out / "report.html").read_text())
    assert len(parser.tables) == 1 and len(parser.tables[0]) == 1 + len(QUICK_METHODS)
    assert len(parser.images) == 2
    for image in parser.images:
        assert matplotlib.image.imread(out / image).ndim == 3


def test_quick_bench_linear_probe_is_below_the_adapters(quick) -> None:
    rows = {row["method"]: row["scores"]["accuracy"][0] for row in _results(quick[0])["tasks"][0]["rows"]}
    probe = rows.pop("linear-probe")
    print(f"quick bench on the cut budget, accuracy: {rows}; linear probe {probe}")
    assert all(accuracy > probe for accuracy in rows.values()), (probe, rows)


LORA_LRS = BENCH_METHODS["lora"].lrs


def _fake_cell(spec: dict[str, Any], seed: int) -> dict[str, Any]:
    """A cell without training: validation accuracy is best at the first lr, validation loss at the last, so the
    chosen lr shows which metric picked it; test scores and cost numbers depend on the seed and backend."""
    lr, steps = spec["lr"], spec["budget"]["steps"]
    val = {"accuracy": 0.9 if lr == LORA_LRS[0] else 0.5, "loss": 0.1 if lr == LORA_LRS[-1] else 1.0}
    return {"status": "ok", "val": val, "test": {"accuracy": 0.5 + 0.1 * seed, "loss": 1.0 - 0.1 * seed},
            "trainable": 10 + (spec["backend"] == "peft"), "total": 100, "saved_bytes": 1, "peak_bytes": 1,
            "samples_per_s": float(steps), "unmerged": 1.1, "merged": 1.0}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """`peftkit bench --full` on the tiny task file with every option, through `main` (the parser, the plan, the
    protocol and the report are real; the cells are `_fake_cell`, the real cells are covered above)."""
    folder = tmp_path_factory.mktemp("bench-options")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("peftkit.bench.worker.isolated_runner", lambda: _fake_cell)
        assert main(["bench", "--full", "--task-file", str(write_task(folder)), "--tasks", "tiny-topics",
                     "--methods", "lora", "--seeds", "2", "--metric", "loss", "--compare-peft", "--budget", "steps=3",
                     "--output", str(folder / "out")]) == 0
    return folder / "out"


def test_task_file_adds_its_task_with_its_budget(tiny_run) -> None:
    [task] = _results(tiny_run)["tasks"]
    assert task["name"] == "tiny-topics" and "max length 16" in task["budget"]  # the file's, not BBC's 128


def test_budget_replaces_the_profiles_steps(tiny_run) -> None:
    task = _results(tiny_run)["tasks"][0]
    assert task["budget"].startswith("3 steps ")  # the task file says 4
    assert {row["samples_per_s"] for row in task["rows"]} == {3.0}  # and the cells got it


def test_seeds_gives_one_score_per_seed(tiny_run) -> None:
    for row in _results(tiny_run)["tasks"][0]["rows"]:
        assert row["scores"]["accuracy"] == pytest.approx([0.5, 0.6])  # seeds 0 and 1 (the profile's: 3)


def test_metric_picks_the_lr_and_is_reported(tiny_run) -> None:
    task = _results(tiny_run)["tasks"][0]
    assert task["metric"] == "loss" and "Learning rate chosen by validation loss" in (tiny_run / "report.md").read_text()
    assert {row["lr"] for row in task["rows"]} == {LORA_LRS[-1]}  # by accuracy: LORA_LRS[0]


def test_compare_peft_adds_peft_rows(tiny_run) -> None:
    rows = [(row["method"], row["backend"], row["trainable"]) for row in _results(tiny_run)["tasks"][0]["rows"]]
    assert rows == [("lora", "peftkit", 10), ("lora", "peft", 11)]


def test_lrs_sets_how_many_rates_each_row_tries(tmp_path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("peftkit.bench.worker.isolated_runner", lambda: _fake_cell)
        assert main(["bench", "--full", "--task-file", str(write_task(tmp_path)), "--tasks", "tiny-topics",
                     "--methods", "lora", "--seeds", "1", "--lrs", "2", "--output", str(tmp_path / "out")]) == 0
    [row] = _results(tmp_path / "out")["tasks"][0]["rows"]
    assert list(row["sweep"]) == [f"{lr:g}" for lr in LORA_LRS[:2]]  # --full alone tries all three
    assert "--lrs 2" in (tmp_path / "out" / "report.md").read_text()  # in the reproduction command


def test_a_bad_budget_is_a_named_error_before_any_cell(tmp_path, capsys) -> None:
    assert main(["bench", "--quick", "--budget", "stepz=3", "--output", str(tmp_path)]) == 2
    assert "unknown budget field 'stepz' (did you mean 'steps'?)" in capsys.readouterr().err
    assert main(["bench", "--quick", "--budget", "steps=many", "--output", str(tmp_path)]) == 2
    assert not (tmp_path / "cache").exists()
