"""`peftkit search` (#19) on the tiny BERT: a budgeted search finishes with its files; the same seed draws the same
designs with the same scores; a larger `trials` or a stopped run resumes and trains only the candidates not yet
scored, ending where an uninterrupted search ends; a design over the budget never trains; the Pareto front is the
non-dominated set and the best design's best.yaml trains through `run_training` with the trainable parameters the
search counted; bad input is an error that names what is wrong."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from peftkit.bench.measure import parameter_counts
from peftkit.cli import main
from peftkit.core.config import config_from_dict
from peftkit.search import SearchError, run_search, search_config
from peftkit.search.cli import parameter_count
from peftkit.search.study import Candidates
from peftkit.train import load_config, run_training
from peftkit.train.config import read_config_file
from tests.train_models import tiny_config

# Two layers: one or two groups; small sizes for a hidden size of 16. Scored by validation loss (the tiny model's
# accuracy on 8 rows ties too often to rank designs).
SPACE = {"groups": [1, 2], "lora_r": [2, 4], "bottleneck_size": [2, 4], "bottleneck_placement": ["pfeiffer", "parallel"],
         "prefix_length": [0, 2], "startup_trials": 3, "val_rows": 8, "trials": 5}


def config(tmp_path: Path, **search: Any) -> dict[str, Any]:
    base = tiny_config(tmp_path, data={"train_limit": 24}, eval={"metric": "loss"}, optimizer={"lr": 1e-2})
    base.pop("method")
    return {**base, "search": {**SPACE, **search}}


def draws(report) -> list[tuple]:
    """What a search found, trial numbers aside (a stopped run's unfinished draw takes a number)."""
    return [(r.outcome, r.label, r.trainable, r.metrics) for r in report.records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    return run_search(config(folder), folder / "out"), folder


@pytest.fixture
def trainings(monkeypatch) -> list[tuple[str, int]]:
    """(design label, trainable parameters) of every candidate trained."""
    seen: list[tuple[str, int]] = []
    train = Candidates.train

    def counted(self, model, design, folder):
        seen.append((folder.name, parameter_counts(model)[0]))
        return train(self, model, design, folder)

    monkeypatch.setattr(Candidates, "train", counted)
    return seen


def test_search_finishes_with_its_files_and_the_pareto_front(full_run) -> None:
    report, folder = full_run
    assert report.count("trained") == 5
    out = folder / "out"
    assert {p.name for p in out.iterdir()} >= {"study.db", "trials.csv", "trials.json", "pareto.md", "pareto.png",
                                                 "best.yaml", "trials"}
    saved = json.loads((out / "trials.json").read_text())["trials"]
    assert [(t["outcome"], t["label"], t["trainable"], t["metrics"]) for t in saved] == draws(report)
    assert len((out / "trials.csv").read_text().splitlines()) == len(report.records) + 1
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scored = report.candidates
    loss = {r.number: r.metrics["loss"] for r in scored}
    dominated = {r.number for r in scored for o in scored
                 if o.trainable <= r.trainable and loss[o.number] <= loss[r.number]
                 and (o.trainable, loss[o.number]) != (r.trainable, loss[r.number])}
    assert {r.number for r in report.pareto} == {r.number for r in scored} - dominated
    assert report.best.metrics["loss"] == min(loss.values()) and report.best in report.pareto
    assert report.median == statistics.median(loss.values())
    assert report.beats_median == (report.best.metrics["loss"] < report.median)
    assert report.beats_median  # the bar: the best design beats the median candidate
    table = (out / "pareto.md").read_text()
    assert all(f"`{r.label}`" in table for r in report.pareto) and f"{report.median:.4f}" in table
    assert all(config_from_dict(r.design).to_dict() == r.design for r in scored)
    assert {r.design["method"] for r in scored} >= {"layer_groups"}  # grouped designs, not only plain methods


def test_best_yaml_trains_through_run_training_with_the_counted_parameters(full_run, tmp_path) -> None:
    report, folder = full_run
    best = load_config(folder / "out" / "best.yaml", {"output.dir": str(tmp_path / "best")})
    assert best.method.to_dict() == report.best.design
    result = run_training(best)
    assert parameter_counts(result.model)[0] == report.best.trainable
    assert (tmp_path / "best" / "adapter").is_dir()


def test_the_same_seed_draws_the_same_designs_and_a_larger_trials_trains_only_the_new_ones(full_run, tmp_path,
                                                                                         trainings) -> None:
    report, _ = full_run
    first = run_search(config(tmp_path, trials=3), tmp_path / "out")
    assert draws(first) == draws(report)[:len(first.records)]  # a fresh search: the same designs, the same scores
    assert len(trainings) == first.count("trained")
    resumed = run_search(config(tmp_path), tmp_path / "out")
    assert len(trainings) == resumed.count("trained") > first.count("trained")  # the first three not trained again
    assert draws(resumed) == draws(report)


def test_another_seed_draws_other_designs(full_run, tmp_path) -> None:
    report, _ = full_run
    other = run_search(config(tmp_path, seed=1, trials=3), tmp_path / "out")
    assert [r.label for r in other.records] != [r.label for r in report.records][:len(other.records)]


def test_a_stopped_search_resumes_where_it_stopped(full_run, tmp_path, monkeypatch) -> None:
    report, _ = full_run
    train, calls = Candidates.train, []

    def stopped_on_the_third(self, model, design, folder):
        calls.append(folder.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return train(self, model, design, folder)

    monkeypatch.setattr(Candidates, "train", stopped_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_search(config(tmp_path), tmp_path / "out")
    listed = (tmp_path / "out" / "trials.csv").read_text().splitlines()
    assert sum(",trained," in line for line in listed) == 2  # the finished draws are on disk
    monkeypatch.setattr(Candidates, "train", train)
    said: list[str] = []
    resumed = run_search(config(tmp_path), tmp_path / "out", say=said.append)
    assert draws(resumed) == draws(report)
    assert any("left unfinished" in line for line in said)
    assert int(calls[2]) not in {r.number for r in resumed.records}  # the stopped draw failed, and came again


def test_a_design_over_the_budget_is_pruned_before_it_trains(tmp_path, trainings) -> None:
    budget = 250  # the tiny head is 85; a prefix of 2 or LoRA r2 on one layer's query and value are 128 more
    report = run_search(config(tmp_path, budget=budget, trials=3), tmp_path / "out",
                        overrides={"eval.metric": "accuracy"})
    over = [r for r in report.records if r.outcome == "over_budget"]
    assert over and all(r.trainable > budget for r in over)
    assert all(count <= budget for _, count in trainings)
    assert {f"{r.number:04d}" for r in over}.isdisjoint(name for name, _ in trainings)
    assert len(trainings) == report.count("trained") and report.metric == "accuracy"
    assert f"{len(over)} over the budget" in (tmp_path / "out" / "pareto.md").read_text()


@pytest.mark.parametrize("search, message", [
    ({"methods": ["none", "loar"]}, "unknown method 'loar' (did you mean 'lora'?)"),
    ({"methods": ["lora", "prefix_tuning"]}, "give its lengths in search.prefix_length"),
    ({"grups": [1]}, "unknown key 'grups' (did you mean 'groups'?)"),
    ({"trials": 0}, "trials: Input should be greater than or equal to 1"),
    ({"lora_r": []}, "lora_r: give at least one choice"),
    ({"parts": {"lora": {"r": 4}}}, "lora: r is searched"),
    ({"parts": {"lora": {"alpha": -1}}}, "parts: LoRA: alpha: Input should be greater than 0"),
    ({"methods": ["none"], "prefix_length": [0]}, "every design of this space is empty"),
    ({"budget": 148}, "budget 148 trainable parameters is below every design of the space: the smallest, "
                      "groups 1-1: ia3 / none, has 149"),  # (IA)3 on one layer: 16 + 16 + 32, the head 85
    ({"groups": [1, 3]}, "3 layer groups need at least as many layers; tiny-bert has 2"),
    ({"val_rows": 24}, "cannot hold out 24 validation rows of 24 training rows"),
])
def test_bad_input_is_an_error_that_names_it(tmp_path, trainings, search, message) -> None:
    with pytest.raises(SearchError) as err:
        run_search(config(tmp_path, **search), tmp_path / "out")
    assert message in str(err.value)
    assert not trainings


def test_another_search_in_a_study_folder_is_refused(full_run) -> None:
    _, folder = full_run
    with pytest.raises(SearchError, match=r"holds another search \(it differs in space.budget\)"):
        run_search(config(folder, budget=10_000), folder / "out")


def test_the_command_line_resumes_and_reports(full_run, capsys) -> None:
    report, folder = full_run
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump({**config(folder), "method": {"method": "lora"}}))
    assert main(["search", str(path), "--trials", "5", "--output", str(folder / "out")]) == 0
    out = capsys.readouterr().out
    assert "method: section is replaced" in out and "Pareto front:" in out and f"`{report.best.label}`" in out
    assert main(["search", str(path), "--trials", "0", "--output", str(folder / "out")]) == 2
    assert "trials: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert main(["search", str(path), "--set", "method.r=4", "--output", str(folder / "out")]) == 2
    assert "replaces the config's method" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", str(path), "--budget", "lots"])
    assert "parameter count like 50000, 50k or 1.5M" in capsys.readouterr().err


def test_parameter_counts_read_with_suffixes() -> None:
    assert [parameter_count(text) for text in ("50000", "50_000", "50k", "1.5M", "2m")] == \
        [50_000, 50_000, 50_000, 1_500_000, 2_000_000]


def test_the_shipped_search_config_is_valid() -> None:
    mapping, search = search_config(read_config_file(Path(__file__).parent.parent / "configs/search/bbc-minilm.yaml"))
    assert (mapping["model"]["name"], search.budget, search.trials) == ("minilm", 100_000, 16)
