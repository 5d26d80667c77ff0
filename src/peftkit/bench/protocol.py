"""The benchmark protocol: which cells run, under which budget, and how a table row is made of them.

For every (task, method) the protocol trains one cell per learning rate in the method's list at the
first seed, picks the rate with the best *validation* score (a split held out of the training rows,
never the test set), then trains the remaining seeds at that rate and reports the test metric's mean
± std over seeds. Every method gets the same steps, batch, data and seeds on a task; only the lr list
is per method. `--quick` uses each method's first lr (no sweep) and one seed; `--standard` the first two (the
lists are ordered best-first); `--full` all of them; `--lrs N` replaces the profile's count.

Each cell is cached (see `cache`): a rerun computes only new cells, an interrupted run resumes.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.config import METHODS, config_from_dict
from ..models import require_extra
from .cache import ResultCache, config_hash
from .methods import BENCH_METHODS, REFERENCE, REFERENCES, all_rows, bench_method
from .report import Row, TaskReport, write_report
from .tasks import (BENCH_TASKS, LOWER_IS_BETTER, BenchTask, Budget, OutputDirError, UnknownMethodError,
                    UnknownMetricError, UnknownTaskError, unknown)

PEFT_BACKEND = "peft"


@dataclass(frozen=True)
class Profile:
    name: str
    seeds: int
    lrs: int | None  # how many of each method's learning rates (its list is best-first) to try; None: all
    timing_rounds: int  # interleaved rounds for the inference-overhead medians
    tasks: tuple[str, ...]  # the default tasks
    methods: Callable[[], list[str]]  # the default rows (evaluated late: methods register on import)


def _quick_methods() -> list[str]:
    return [name for name, entry in BENCH_METHODS.items() if entry.quick]  # the reference rows come last


PROFILES = {
    "quick": Profile("quick", seeds=1, lrs=1, timing_rounds=5, tasks=("bbc-news",), methods=_quick_methods),
    "standard": Profile("standard", seeds=1, lrs=2, timing_rounds=5, tasks=("bbc-news",), methods=all_rows),
    "full": Profile("full", seeds=3, lrs=None, timing_rounds=11, tasks=tuple(BENCH_TASKS), methods=all_rows),
}


@dataclass
class BenchPlan:
    """A checked benchmark request: everything named exists and the output folder is writable."""

    profile: Profile
    tasks: list[BenchTask]
    methods: list[str]
    seeds: int
    output: Path
    compare_peft: bool = False
    command: str = ""
    isolate: bool = True  # one fresh worker process per cell (peak memory per cell; see measure)
    lrs: int | None = None  # how many of each method's lrs to try (None: all); plan_bench sets the profile's or --lrs

    def describe(self) -> str:
        if self.lrs == 1:
            lrs = "each method's first lr only (no sweep)"
        else:
            which = "every lr" if self.lrs is None else f"up to the first {self.lrs} lrs"
            lrs = f"{which} of each method's best-first list swept at seed 0 (best validation score kept)"
        return f"profile {self.profile.name}: {self.seeds} seed(s); {lrs}; {self.profile.timing_rounds} timing rounds"


def plan_bench(profile: str = "quick", tasks: Sequence[str] | None = None, methods: Sequence[str] | None = None,
               seeds: int | None = None, output: str | os.PathLike = "runs/bench", metric: str | None = None,
               compare_peft: bool = False, extra_tasks: Sequence[BenchTask] = (), command: str = "",
               isolate: bool = True, budget: Mapping[str, int | None] | None = None,
               lrs: int | None = None) -> BenchPlan:
    """Check a request and return its plan; every bad name is a `BenchConfigError` before anything runs.

    `budget` replaces fields of the profile's budget on every task (a cheaper run: CI's, a smoke test)."""
    require_extra("matplotlib", "bench")  # the report's plots, drawn after every cell has run
    if compare_peft:
        require_extra("peft", "bench")
    if profile not in PROFILES:
        raise UnknownTaskError(unknown("profile", profile, list(PROFILES)))
    chosen = PROFILES[profile]
    known_tasks = {**BENCH_TASKS, **{t.name: t for t in extra_tasks}}
    task_names = list(tasks) if tasks else [*chosen.tasks, *(t.name for t in extra_tasks)]
    for name in task_names:
        if name not in known_tasks:
            raise UnknownTaskError(unknown("task", name, list(known_tasks)))
    selected = [known_tasks[name] for name in task_names]
    for task in selected:
        if chosen.name not in task.budgets:
            raise UnknownTaskError(f"task {task.name} has no budget for profile {chosen.name} "
                                   f"(it has: {', '.join(task.budgets)})")
    if metric is not None:
        missing = [t.name for t in selected if metric not in t.metrics]
        if missing:
            every = sorted({m for t in selected for m in t.metrics})
            raise UnknownMetricError(f"{unknown('metric', metric, every)} (tasks without it: {', '.join(missing)})")
        selected = [t.with_metric(metric) for t in selected]
    if budget:
        selected = [t.with_budget(chosen.name, budget) for t in selected]
    rows = list(methods) if methods else chosen.methods()
    known = all_rows()
    for name in rows:
        if name not in known:
            raise UnknownMethodError(unknown("method", name, known))
    for name, value in (("seeds", seeds), ("lrs", lrs)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return BenchPlan(chosen, selected, rows, seeds or chosen.seeds, _writable(Path(output)), compare_peft,
                     command, isolate, lrs or chosen.lrs)


def _writable(folder: Path) -> Path:
    """`folder`, created if needed, after proving a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputDirError(f"cannot write the benchmark output to {folder}: {err.strerror or err}") from None
    return folder


# --- cells ---------------------------------------------------------------------------------------

def cell_spec(task: BenchTask, method: str, backend: str, budget: Budget, lr: float, timing_rounds: int) -> dict[str, Any]:
    """Everything that determines a cell's numbers except the seed, as JSON (hashed for the cache key).

    `defaults` is the config with every field the bench leaves unset filled in, so a changed default is a new cell.
    A change to a method's code is not seen: delete its folder under OUTPUT/cache (or use a new OUTPUT)."""
    entry = bench_method(method)
    fields = entry.config_fields(task.family, budget.steps)
    defaults = config_from_dict(fields).to_dict() if fields["method"] in METHODS else None
    return {"task": {"name": task.name, "task": task.task, "model": task.model, "data": task.data,
                     "family": task.family, "metrics": list(task.metrics), "imports": list(task.imports)},
            "method": method, "backend": backend, "config": fields, "defaults": defaults,
            "budget": vars(budget), "lr": lr, "timing_rounds": timing_rounds}


CellRunner = Callable[[dict[str, Any], int], dict[str, Any]]  # (spec, seed) -> result


@dataclass
class Progress:
    computed: int = 0
    cached: int = 0
    log: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr, flush=True))


def _cell(cache: ResultCache, run: CellRunner, spec: dict[str, Any], seed: int, progress: Progress) -> dict[str, Any]:
    key = (spec["task"]["name"], f"{spec['method']}@{spec['backend']}", config_hash(spec), seed)
    found = cache.get(*key)
    if found is not None:
        progress.cached += 1
        return found
    label = f"{spec['task']['name']} / {spec['method']} ({spec['backend']}) lr={spec['lr']:g} seed={seed}"
    progress.log(f"[bench] running {label}")
    start = time.perf_counter()
    result = run(spec, seed)
    progress.computed += 1
    if result.get("status") == "ok":  # a failure is reported, not cached: the next run retries it
        cache.put(*key, result)
    progress.log(f"[bench] done {label} in {time.perf_counter() - start:.0f} s")
    return result


def _better(metric: str, a: float, b: float) -> bool:
    return a < b if metric in LOWER_IS_BETTER else a > b


def run_row(task: BenchTask, method: str, backend: str, budget: Budget, plan: BenchPlan, cache: ResultCache,
            run: CellRunner, progress: Progress) -> Row:
    """One table row: the lr sweep at the first seed, then the other seeds at the chosen lr."""
    entry = bench_method(method)
    reason = entry.skip_reason(task.family)
    if reason is not None:
        return Row(method, backend, status="skipped", reason=reason)
    before = (progress.computed, progress.cached)
    lrs = entry.lrs[:plan.lrs]
    first = {lr: _cell(cache, run, cell_spec(task, method, backend, budget, lr, plan.profile.timing_rounds), 0,
                       progress) for lr in lrs}
    if (failed := _failed(method, backend, list(first.values()))) is not None:
        return failed
    best = lrs[0]
    for lr in lrs[1:]:
        if _better(task.metric, first[lr]["val"][task.metric], first[best]["val"][task.metric]):
            best = lr
    spec = cell_spec(task, method, backend, budget, best, plan.profile.timing_rounds)
    results = [first[best]] + [_cell(cache, run, spec, seed, progress) for seed in range(1, plan.seeds)]
    if (failed := _failed(method, backend, results)) is not None:
        return failed
    return _row(method, backend, best, first, task, results, progress, before)


def _failed(method: str, backend: str, results: list[dict]) -> Row | None:
    """A failed row naming the first failed cell's error, or None when every cell succeeded."""
    failed = next((r for r in results if r.get("status") != "ok"), None)
    return None if failed is None else Row(method, backend, status="failed", reason=failed.get("error", "unknown error"))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _row(method: str, backend: str, lr: float, sweep: dict[float, dict], task: BenchTask, results: list[dict],
         progress: Progress, before: tuple[int, int]) -> Row:
    merged = [r["merged"] for r in results]
    return Row(method, backend, lr=lr, sweep={f"{k:g}": v["val"][task.metric] for k, v in sweep.items()},
               scores={m: [r["test"][m] for r in results] for m in task.metrics},
               trainable=results[0]["trainable"], total=results[0]["total"], saved_bytes=results[0]["saved_bytes"],
               peak_bytes=round(_mean([r["peak_bytes"] for r in results])),
               samples_per_s=_mean([r["samples_per_s"] for r in results]),
               unmerged=_mean([r["unmerged"] for r in results]),
               merged=None if None in merged else _mean(merged),
               computed_cells=progress.computed - before[0], cached_cells=progress.cached - before[1])


def run_bench(plan: BenchPlan, run: CellRunner | None = None,
              progress: Progress | None = None) -> tuple[list[TaskReport], dict[str, Any]]:
    """Run (or read from the cache) every cell of the plan and write the report."""
    from .worker import isolated_runner, run_cell

    run = run or (isolated_runner() if plan.isolate else run_cell)
    progress = progress or Progress()
    cache = ResultCache(plan.output / "cache")
    reports = []
    for task in plan.tasks:
        budget = task.budgets[plan.profile.name]
        rows = []
        for method in plan.methods:
            backend = REFERENCE if method in REFERENCES else "peftkit"
            rows.append(run_row(task, method, backend, budget, plan, cache, run, progress))
            if plan.compare_peft and bench_method(method).peft:
                rows.append(run_row(task, method, PEFT_BACKEND, budget, plan, cache, run, progress))
        reports.append(TaskReport(task.name, task.title, task.metric, list(task.metrics), rows,
                                  budget.describe(images=task.images)))
    return reports, write_report(plan.output, header(plan, progress), reports)


def header(plan: BenchPlan, progress: Progress) -> list[str]:
    """The report's preamble: how the numbers were made, so runs with equal headers are comparable."""
    import platform

    from .measure import peak_memory_method

    return [
        f"Command: `{plan.command}`" if plan.command else "",
        f"Protocol: {plan.describe()}; seeds used: {plan.seeds} (0..{plan.seeds - 1}). Each method's "
        "learning rate is chosen on a validation split held out of the training rows; the table reports the test "
        "metric at that rate, mean ± sample std over seeds. All methods on a task share its budget (below).",
        f"Rows: {', '.join(plan.methods)}" + (" (and Hugging Face PEFT's version where it has the method)"
                                               if plan.compare_peft else ""),
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}; peak training memory: {peak_memory_method()}"
        f"{', one fresh process per cell' if plan.isolate else ', all cells in one process'}; "
        "inference ×base: median forward time over interleaved rounds relative to the bare base model.",
        f"Cells: {progress.computed} computed, {progress.cached} from the cache ({plan.output / 'cache'}).",
    ]
