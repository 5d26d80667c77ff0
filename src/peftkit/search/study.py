"""`run_search`: a budgeted search over PEFT designs, driven by Optuna's TPE, resumable and reproducible.

Every candidate trains as the benchmark trains a method (bench/): the same steps, batch, learning rate, data and seed
for all, on the training rows less a validation split held out of them (seeded, the same for every candidate), and
is scored on that split; the config's eval and test splits are never looked at. A draw's trainable parameters are
counted by attaching it to a copy of the model: one over the budget is pruned before it trains.

The study lives in OUTPUT/study.db (SQLite). A run draws designs until `trials` designs are trained (a design drawn
again is scored from its first training), so a rerun with a larger `trials` trains only the new ones, and a run cut
short resumes where it stopped. Each draw's sampler is TPE (random right after a repeat) seeded by (seed, draws
finished): the designs depend only on the seed and the results before them, so a resumed search draws what an
uninterrupted one would have, its unfinished draw included.
"""
from __future__ import annotations

import copy
import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import ValidationError
from torch import nn

import peftkit
from ..bench.measure import parameter_counts
from ..bench.worker import split_rows
from ..core.config import AdapterConfig, validation_message
from ..methods.hybrid.layer_groups import num_layers
from ..models import require_extra
from ..train import TASKS, Task, TaskData, TrainConfig, Trainer, config_from_mapping
from ..train.config import _apply_override, read_config_file
from ..train.tasks import num_rows
from ..train.trainer import method_steps
from .report import SearchReport, TrialRecord, write_reports, write_trials
from .space import Design, SearchError, SearchSection, build, draw, smallest_designs

STUDY = "peftkit-search"
DRAWS_PER_TRIAL = 20  # draws per wanted candidate before the search stops looking for designs under the budget
PLACEHOLDER = {"method": "prefix_tuning"}  # lets the config's other sections validate; each candidate replaces it


@dataclass
class Candidates:
    """What every candidate shares: the config, the task, the base model (loaded once, its head initialised with
    the config's seed) and the training rows split into train and validation."""

    config: TrainConfig
    task: Task
    base: nn.Module
    processor: Any
    data: TaskData
    head: list[str]  # modules trained whole beside every design (the task head)

    @classmethod
    def load(cls, config: TrainConfig, val_rows: int | None) -> "Candidates":
        task = TASKS[config.task]()
        if (config.eval.metric or task.metric) == "accuracy" and task.metric != "accuracy":
            raise SearchError(f"eval.metric: task {task.name} has no accuracy; use loss")
        torch.manual_seed(config.seed)
        raw = task.read_data(config.data, config.seed)
        base, processor = task.load_model(config.model, raw)
        encoded = task.encode(raw, processor, config.data)
        rows = num_rows(encoded.train)
        held_out = val_rows or rows // 5
        if not 0 < held_out < rows:
            raise SearchError(f"search.val_rows: cannot hold out {held_out} validation rows of {rows} training rows")
        train, validation = split_rows(encoded.train, held_out)
        head = task.head_modules(config.model) if config.model.train_head else []
        return cls(config, task, base, processor, TaskData(train, validation, encoded.labels), head)

    @property
    def metric(self) -> str:
        return self.config.eval.metric or self.task.metric

    def attach(self, design: AdapterConfig) -> nn.Module:
        """A copy of the base with the design and the task head attached, initialised as a run with this seed."""
        torch.manual_seed(self.config.seed)
        model = copy.deepcopy(self.base)
        with_head = design.model_copy(update={"modules_to_save": [*design.modules_to_save, *self.head]})
        peftkit.attach(model, with_head, name=self.config.adapter_name)
        return model

    def train(self, model: nn.Module, design: AdapterConfig, folder: Path) -> tuple[dict[str, float], float]:
        """Train the attached design under the config's schedule (no checkpoints, no plot; its config.yaml and
        metrics.jsonl in `folder`); its metrics on the validation rows, and the seconds its steps took."""
        config = self.config.to_dict()
        config = config_from_mapping({**config, "method": design.to_dict(), "progress": False,
                                      "eval": {**config["eval"], "before": False, "restore_best": False},
                                      "output": {**config["output"], "dir": str(folder), "save": False, "plot": False}})
        steps = method_steps(config, model, self.task, self.data)
        result = Trainer(model, self.task, self.data, config, steps, self.processor).fit()
        return result.after, result.train_seconds


def search_config(mapping: Any, overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], SearchSection]:
    """(the training config without its `search:` and `method:` sections, the search) from a config's plain values,
    after dotted `overrides` ("search.trials": 8, "schedule.max_steps": 20); every bad key or value is an error."""
    if not isinstance(mapping, dict):
        raise SearchError(f"a search config must be a mapping (a training config and a search: section), "
                          f"not {type(mapping).__name__}")
    mapping = yaml.safe_load(yaml.safe_dump(mapping, sort_keys=False))  # a deep copy of plain values
    for dotted, value in (overrides or {}).items():
        _apply_override(mapping, dotted, value)
    mapping.pop("method", None)  # each candidate's design replaces it (run_search says so)
    section = mapping.pop("search", None) or {}
    if not isinstance(section, dict):
        raise SearchError(f"search: must be a mapping of the space's keys, not {type(section).__name__}")
    try:
        search = SearchSection(**section)
    except ValidationError as err:
        raise SearchError(f"invalid search section: {validation_message(err)}") from None
    config_from_mapping({**mapping, "method": PLACEHOLDER})  # every other section's error, now
    return mapping, search


def _storage(db: Path) -> Any:
    """The study's SQLite database, in WAL mode with synchronous=NORMAL: a commit does not wait for the disk (a
    machine that dies may lose the last draws, which the resume draws again), and the file is never left corrupt."""
    import optuna

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(db)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    return optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}", engine_kwargs={"creator": connect})


def _spec(mapping: dict[str, Any], search: SearchSection) -> dict[str, Any]:
    """What must match for a run to resume a study: the config (its method aside) and the space."""
    return json.loads(json.dumps({"config": mapping, "space": search.spec()}))


def _check_same_search(found: dict[str, Any], spec: dict[str, Any], db: Path) -> None:
    differs = [f"{part}.{key}" for part in ("config", "space")
               for key in sorted(set(found[part]) | set(spec[part])) if found[part].get(key) != spec[part].get(key)]
    if differs:
        raise SearchError(f"{db} holds another search (it differs in {', '.join(differs)}): give the same config and "
                          "flags to resume it, or another --output")


def _smallest(candidates: Candidates, search: SearchSection, layers: int) -> tuple[int, str]:
    """The fewest trainable parameters a design of the space has, and that design's label."""
    sizes = []
    for params in smallest_designs(search, layers):
        design = build(params, search, layers)
        sizes.append((parameter_counts(candidates.attach(design.config))[0], design.label))
    return min(sizes)


def run_search(config: dict[str, Any] | str | os.PathLike, output: str | os.PathLike,
               overrides: dict[str, Any] | None = None, command: str = "",
               say: Callable[[str], None] = lambda message: None) -> SearchReport:
    """Search designs as `config`'s `search:` section says (with `overrides`), training each candidate under the
    config's schedule; write OUTPUT/trials.csv, trials.json, pareto.md, pareto.png and best.yaml (see the module
    docstring). `say(message)` hears every draw."""
    require_extra("optuna", "search")
    require_extra("matplotlib", "search")
    import optuna

    raw = read_config_file(config) if isinstance(config, (str, os.PathLike)) else config
    mapping, search = search_config(raw, overrides)
    if "method" in raw:
        say("the config's method: section is replaced by each candidate's design")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    storage = _storage(output / "study.db")
    spec = _spec(mapping, search)
    if STUDY in optuna.get_all_study_names(storage):
        _check_same_search(optuna.load_study(study_name=STUDY, storage=storage).user_attrs["spec"], spec,
                           output / "study.db")
    base = config_from_mapping({**mapping, "method": PLACEHOLDER})
    say(f"loading {base.model.name} and the data")
    candidates = Candidates.load(base, search.val_rows)
    layers = num_layers(candidates.base)
    if max(search.groups) > layers:
        raise SearchError(f"search.groups: {max(search.groups)} layer groups need at least as many layers; "
                          f"{base.model.name} has {layers}")
    fewest, smallest = _smallest(candidates, search, layers)
    if search.budget is not None and search.budget < fewest:
        raise SearchError(f"budget {search.budget:,} trainable parameters is below every design of the space: the "
                          f"smallest, {smallest}, has {fewest:,} (the task head included)")
    direction = "minimize" if candidates.metric == "loss" else "maximize"
    study = optuna.create_study(storage=storage, study_name=STUDY, direction=direction, load_if_exists=True)
    study.set_user_attr("spec", spec)
    _draw_until(storage, search, candidates, layers, output, mapping, command, say)
    return write_reports(output, _report(study, candidates, search), mapping, command)


def _report(study: Any, candidates: Candidates, search: SearchSection) -> SearchReport:
    return SearchReport([TrialRecord.of(trial) for trial in _finished(study)], candidates.metric, search.budget, search.seed,
                        num_rows(candidates.data.eval), candidates.config.model.name,
                        candidates.config.data.name or str(candidates.config.data.train))


def _draw_until(storage: Any, search: SearchSection, candidates: Candidates, layers: int, output: Path,
                mapping: dict[str, Any], command: str, say: Callable[[str], None]) -> None:
    """Draw designs until `search.trials` are trained (or the draws run out); trials.csv / .json after each draw."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=STUDY, storage=storage)

    unfinished = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in unfinished:  # a run that was stopped: its draw comes again (same seed, same results before it)
        study.tell(trial.number, state=TrialState.FAIL)
    if unfinished:
        say(f"{len(unfinished)} draw(s) left unfinished by an earlier run: drawn again")
    draws = 0
    while (trained := _report(study, candidates, search).count("trained")) < search.trials:
        if draws >= DRAWS_PER_TRIAL * search.trials:
            write_reports(output, _report(study, candidates, search), mapping, command)
            raise SearchError(f"{draws} draws found only {trained} of {search.trials} designs to train: the others were "
                              "empty, over the budget or drawn before; raise the budget or widen the space")
        study = optuna.load_study(study_name=STUDY, storage=storage, sampler=_sampler(_finished(study), search.seed,
                                                                                    search.startup_trials))
        trial = study.ask()
        draws += 1
        design = build(draw(trial, search), search, layers)
        _score(study, trial, design, search, candidates, output / "trials" / f"{trial.number:04d}", say)
        write_trials(output, _report(study, candidates, search))


def _sampler(finished: list[Any], seed: int, startup_trials: int) -> Any:
    """The next draw's sampler: TPE, or a random draw right after a design drawn again (once TPE's model settles it
    proposes its best design again, and a repeat teaches it nothing), seeded by (seed, draws finished)."""
    import optuna

    seed = int(np.random.SeedSequence([seed, len(finished)]).generate_state(1)[0])
    if finished and finished[-1].user_attrs.get("outcome") == "repeat":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=False, n_startup_trials=startup_trials,
                                      constant_liar=False)


def _finished(study: Any) -> list[Any]:
    """The draws that are done: scored (COMPLETE), pruned (PRUNED), and designs drawn again (FAIL, outcome repeat:
    TPE leaves FAIL out, so a design's score counts once in its model); not a draw a stopped run left unfinished."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or t.state == TrialState.FAIL and t.user_attrs.get("outcome") == "repeat"]


def _earlier(study: Any, label: str) -> Any:
    """The first finished draw of the design with this label, or None."""
    from optuna.trial import TrialState

    return next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                 if t.user_attrs.get("label") == label), None)


def _score(study: Any, trial: Any, design: Design | None, search: SearchSection, candidates: Candidates,
           folder: Path, say: Callable[[str], None]) -> None:
    """Prune, reuse or train one draw. A design drawn before is not attached or trained again: its count and score
    are reused."""
    from optuna.trial import TrialState

    where = f"trial {trial.number}"
    if design is None:
        trial.set_user_attr("outcome", "empty")
        study.tell(trial, state=TrialState.PRUNED)
        say(f"{where}: no method in any group and no prefix: pruned")
        return
    trial.set_user_attr("label", design.label)
    trial.set_user_attr("design", design.config.to_dict())
    same = _earlier(study, design.label)
    try:
        model = candidates.attach(design.config) if same is None else None
        trainable = parameter_counts(model)[0] if same is None else same.user_attrs["trainable"]
        trial.set_user_attr("trainable", trainable)
        if search.budget is not None and trainable > search.budget:
            trial.set_user_attr("outcome", "over_budget")
            study.tell(trial, state=TrialState.PRUNED)
            say(f"{where}: {design.label}: {trainable:,} trainable > budget {search.budget:,}: pruned")
            return
        if same is not None:
            for key, value in (("metrics", same.user_attrs["metrics"]), ("same_as", same.number),
                               ("outcome", "repeat")):
                trial.set_user_attr(key, value)
            study.tell(trial, state=TrialState.FAIL)  # see _finished
            say(f"{where}: {design.label}: drawn before (trial {same.number}): its score again")
            return
        start = time.perf_counter()
        metrics, seconds = candidates.train(model, design.config, folder)
    except ValueError as err:  # the design does not fit this model (targets, sizes): a space to fix
        study.tell(trial, state=TrialState.FAIL)
        raise SearchError(f"{where} ({design.label}) failed: {err}") from err
    except Exception:
        study.tell(trial, state=TrialState.FAIL)
        raise
    for key, value in (("metrics", metrics), ("seconds", seconds), ("outcome", "trained")):
        trial.set_user_attr(key, value)
    study.tell(trial, metrics[candidates.metric])
    say(f"{where}: {design.label}: {trainable:,} trainable, validation {candidates.metric} "
        f"{metrics[candidates.metric]:.4f} ({time.perf_counter() - start:.0f} s)")
