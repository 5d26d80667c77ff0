"""Benchmark tasks: a trainer task, model and data, the model family the method table is keyed by,
the metrics it reports, and the budget each profile gives it.

Bundled: MiniLM on BBC News, SmolLM2 on chatterbot dialogues, EfficientNet-Lite0 and the DINOv2 ViT-S/14 on
Fashion-MNIST.
A user task comes from a small YAML file (see `load_task_file`), with local data files and any
bundled model (or one registered by a module it names under `imports`).
"""
from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .methods import FAMILIES

METRICS = {"classify-text": ("accuracy", "loss"), "classify-image": ("accuracy", "loss"),
           "causal-lm-chat": ("loss", "exact_match")}
LOWER_IS_BETTER = frozenset({"loss"})
MODEL_FAMILIES = {"minilm": "bert", "smollm2": "llama", "efficientnet-lite0": "cnn", "vit-small": "vit"}


class BenchConfigError(ValueError):
    """A benchmark request that cannot run; raised before any cell starts."""


class UnknownTaskError(BenchConfigError):
    pass


class UnknownMethodError(BenchConfigError):
    pass


class UnknownMetricError(BenchConfigError):
    pass


class OutputDirError(BenchConfigError):
    pass


def unknown(what: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {name!r}{hint}; known: {', '.join(known)}"


@dataclass(frozen=True)
class Budget:
    """The training budget every method gets on one task in one profile (the report prints it)."""

    steps: int  # optimizer steps
    batch_size: int
    train_rows: int | None  # training examples drawn (seeded) from the train split; None: all
    val_rows: int  # held out of those for choosing the learning rate
    test_rows: int | None  # test examples; None: the whole test split
    max_length: int = 128  # text tasks: tokens per example
    image_size: int = 224  # image tasks: pixels per side

    def describe(self, images: bool) -> str:
        rows = "all" if self.train_rows is None else str(self.train_rows)
        test = "all" if self.test_rows is None else str(self.test_rows)
        size = f"image size {self.image_size}" if images else f"max length {self.max_length}"
        return (f"{self.steps} steps × batch {self.batch_size}; train rows {rows} minus {self.val_rows} for "
                f"validation; test rows {test}; {size}")


@dataclass(frozen=True)
class BenchTask:
    name: str
    title: str
    family: str  # key into the method table: bert | llama | cnn | vit
    task: str  # trainer task: classify-text | causal-lm-chat | classify-image | a registered one
    model: dict[str, Any]  # the trainer's model section
    data: dict[str, Any]  # the trainer's data section (limits and lengths come from the budget)
    metric: str  # the metric that picks the learning rate and is plotted
    budgets: dict[str, Budget]  # profile -> budget
    imports: tuple[str, ...] = ()  # modules to import first (they register models or tasks)
    metrics: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.metrics:
            object.__setattr__(self, "metrics", METRICS.get(self.task, (self.metric,)))

    @property
    def images(self) -> bool:
        """Whether the inputs are images (the budget's image size applies, not its max length)."""
        return self.family in ("cnn", "vit")

    def with_metric(self, metric: str) -> "BenchTask":
        if metric not in self.metrics:
            raise UnknownMetricError(f"task {self.name}: " + unknown("metric", metric, list(self.metrics)))
        return replace(self, metric=metric)

    def with_budget(self, profile: str, changes: Mapping[str, int | None]) -> "BenchTask":
        """This task with some fields of one profile's budget replaced (`peftkit bench --budget steps=8`)."""
        known = [f.name for f in fields(Budget)]
        for key in changes:
            if key not in known:
                raise BenchConfigError(unknown("budget field", key, known))
        return replace(self, budgets={**self.budgets, profile: replace(self.budgets[profile], **changes)})


QUICK_BBC = Budget(steps=30, batch_size=16, train_rows=400, val_rows=80, test_rows=200, max_length=64)

BENCH_TASKS: dict[str, BenchTask] = {t.name: t for t in [
    BenchTask("bbc-news", "all-MiniLM-L6-v2 on BBC News topics (5 classes)", "bert", "classify-text",
              {"name": "minilm"}, {"name": "bbc-news"}, "accuracy",
              {"quick": QUICK_BBC,
               "standard": Budget(steps=60, batch_size=16, train_rows=800, val_rows=160, test_rows=400, max_length=64),
               "full": Budget(steps=200, batch_size=16, train_rows=None, val_rows=200, test_rows=None, max_length=128)}),
    BenchTask("chatterbot", "SmolLM2-135M-Instruct on chatterbot dialogues (answers only)", "llama",
              "causal-lm-chat", {"name": "smollm2"}, {"name": "chatterbot"}, "loss",
              {"full": Budget(steps=150, batch_size=8, train_rows=None, val_rows=60, test_rows=None, max_length=96)}),
    BenchTask("fashion-mnist", "EfficientNet-Lite0 on Fashion-MNIST (10 classes, 224 px)", "cnn", "classify-image",
              {"name": "efficientnet-lite0"}, {"name": "fashion-mnist"}, "accuracy",
              {"full": Budget(steps=150, batch_size=16, train_rows=3000, val_rows=500, test_rows=1000)}),
    # 112 px (8 x 8 patches, position embeddings interpolated): a ViT-S step at 224 px costs ~5x on a CPU
    BenchTask("fashion-mnist-vit", "DINOv2 ViT-S/14 on Fashion-MNIST (10 classes)", "vit", "classify-image",
              {"name": "vit-small"}, {"name": "fashion-mnist"}, "accuracy",
              {"quick": Budget(steps=20, batch_size=16, train_rows=320, val_rows=64, test_rows=160, image_size=112),
               "standard": Budget(steps=60, batch_size=16, train_rows=960, val_rows=160, test_rows=500, image_size=112),
               "full": Budget(steps=150, batch_size=16, train_rows=3000, val_rows=500, test_rows=1000, image_size=112)}),
]}


def load_task_file(path: str | os.PathLike) -> BenchTask:
    """A user task from YAML: name, task, model, data (the trainer's sections), and optionally title, family
    (needed for a model that is not bundled), metric, imports, and a budget per profile
    (`budget: {quick: {steps: .., batch_size: .., ...}, full: {...}}`; default: BBC News's)."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise UnknownTaskError(f"task file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise BenchConfigError(f"task file {path} is not valid YAML: {err}") from None
    allowed = {"name", "title", "family", "task", "model", "data", "metric", "imports", "budget"}
    if not isinstance(spec, dict) or not {"name", "task", "model", "data"} <= spec.keys():
        raise BenchConfigError(f"task file {path} must be a mapping with at least name, task, model and data")
    for key in spec:
        if key not in allowed:
            raise BenchConfigError(f"task file {path}: " + unknown("key", str(key), sorted(allowed)))
    for module in spec.get("imports", []):
        importlib.import_module(module)
    model = spec["model"] if isinstance(spec["model"], dict) else {"name": spec["model"]}
    family = spec.get("family") or MODEL_FAMILIES.get(model.get("name"))
    if family not in FAMILIES:
        raise BenchConfigError(f"task file {path}: family {family!r} must be one of {', '.join(FAMILIES)} "
                               f"(it picks each method's default targets; bundled models set it themselves)")
    defaults = BENCH_TASKS["bbc-news"].budgets
    try:
        budgets = {profile: replace(defaults[profile], **spec.get("budget", {}).get(profile, {})) for profile in defaults}
    except TypeError as err:
        raise BenchConfigError(f"task file {path}: bad budget: {err}") from None
    from pydantic import ValidationError

    from ..train.config import DataSection, ModelSection
    from ..train.tasks import TASKS, MODELS

    if spec["task"] not in TASKS:
        raise UnknownTaskError(f"task file {path}: " + unknown("trainer task", spec["task"], list(TASKS)))
    if model.get("name") not in MODELS:
        raise BenchConfigError(f"task file {path}: " + unknown("model", str(model.get("name")), list(MODELS)))
    try:  # the trainer's own sections: unknown keys and bad values are errors now, and the data is read once
        TASKS[spec["task"]]().read_data(DataSection(**spec["data"]), seed=0)
        ModelSection(**model)
    except ValidationError as err:
        raise BenchConfigError(f"task file {path}: {err}") from None
    except ValueError as err:  # the trainer's DataError: missing file, column, label outside the declared set
        raise BenchConfigError(f"task file {path}: {err}") from None
    task = BenchTask(spec["name"], spec.get("title", spec["name"]), family, spec["task"], model, dict(spec["data"]),
                     spec.get("metric") or METRICS.get(spec["task"], ("loss",))[0], budgets,
                     tuple(spec.get("imports", [])))
    return task.with_metric(task.metric)
