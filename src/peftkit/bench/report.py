"""The benchmark report: a Markdown and an HTML table per task, two plots per task, the raw rows.

Everything the tables show comes from `Row`s built by the protocol; the header says how they were
produced (the command line, the budget rules, the machine), so two reports are comparable exactly
when their headers agree.
"""
from __future__ import annotations

import html
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cache import write_atomically


@dataclass
class Row:
    """One table row: a method (or reference) on one task, through one backend."""

    method: str
    backend: str = "peftkit"  # or "peft" (Hugging Face PEFT, `--compare-peft`)
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""  # why skipped or failed
    lr: float | None = None  # the learning rate the sweep chose
    sweep: dict[str, float] = field(default_factory=dict)  # lr -> validation metric (seed 0)
    scores: dict[str, list[float]] = field(default_factory=dict)  # metric -> test value per seed
    trainable: int = 0
    total: int = 0
    saved_bytes: int = 0
    peak_bytes: int = 0
    samples_per_s: float = 0.0
    unmerged: float | None = None  # inference time / base's
    merged: float | None = None  # None: the method cannot merge
    cached_cells: int = 0
    computed_cells: int = 0

    def mean(self, metric: str) -> float:
        return sum(self.scores[metric]) / len(self.scores[metric])

    def std(self, metric: str) -> float:
        """Sample standard deviation over seeds (0 with one seed)."""
        values = self.scores[metric]
        if len(values) < 2:
            return 0.0
        mean = self.mean(metric)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class TaskReport:
    name: str
    title: str  # model and data, in words
    metric: str  # the one that chose the lr and is plotted
    metrics: list[str]  # all reported, `metric` among them
    rows: list[Row]
    budget: str  # the budget, in words


COLUMNS = ("method", "backend", "trainable params", "trainable %", "saved size", "peak train memory",
           "train samples/s", "inference ×base (unmerged)", "inference ×base (merged)", "lr")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _ratio(value: float | None, missing: str) -> str:
    return missing if value is None else f"{value:.2f}×"


def cells(row: Row, metrics: list[str]) -> list[str]:
    """A row's table cells, in `header_cells` order."""
    width = len(COLUMNS) + len(metrics)
    if row.status != "ok":  # an error message may span lines: a table cell may not
        return [row.method, row.backend, f"{row.status}: {' '.join(row.reason.split())}", *[""] * (width - 3)]
    return [row.method, row.backend, f"{row.trainable:,}", f"{100 * row.trainable / max(row.total, 1):.3f}%",
            _size(row.saved_bytes), _size(row.peak_bytes), f"{row.samples_per_s:.1f}",
            _ratio(row.unmerged, "—"), _ratio(row.merged, "cannot merge"), f"{row.lr:g}",
            *(f"{row.mean(m):.4f} ± {row.std(m):.4f} (n={len(row.scores[m])})" for m in metrics)]


def header_cells(metrics: list[str]) -> list[str]:
    return [*COLUMNS, *(f"{m} (mean ± std)" for m in metrics)]


def markdown_table(task: TaskReport) -> str:
    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    header = header_cells(task.metrics)
    lines = [line(header), "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    return "\n".join(lines + [line(cells(row, task.metrics)) for row in task.rows])


def html_table(task: TaskReport) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header_cells(task.metrics))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells(row, task.metrics)) + "</tr>\n"
                   for row in task.rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def plot_task(task: TaskReport, folder: Path) -> list[Path]:
    """Metric vs trainable parameters (log x) and metric vs peak training memory; one point per ok row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in task.rows if row.status == "ok"]
    paths = []
    for stem, xlabel, x_of, log in (("params", "trainable parameters (log scale)", lambda r: max(r.trainable, 1), True),
                                    ("memory", "peak training memory (MiB)", lambda r: r.peak_bytes / 2**20, False)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in done:
            marker = "o" if row.backend == "peftkit" else "s"
            y = row.mean(task.metric)
            ax.errorbar(x_of(row), y, yerr=row.std(task.metric), fmt=marker, capsize=3)
            ax.annotate(row.method if row.backend == "peftkit" else f"{row.method} ({row.backend})", (x_of(row), y),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(task.metric)
        ax.set_title(f"{task.name}: {task.metric} vs {stem}")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path, image = folder / f"{task.name}-{task.metric}-vs-{stem}.png", io.BytesIO()
        fig.savefig(image, format="png", dpi=100)
        write_atomically(path, image.getvalue())
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(folder: Path, header: list[str], tasks: list[TaskReport]) -> dict[str, Any]:
    """Write report.md, report.html, results.json and the plots into `folder`; return their paths
    (keys markdown, html, json; plots: a list)."""
    folder.mkdir(parents=True, exist_ok=True)
    md, body = ["# peftkit bench", "", *header, ""], []
    plots: dict[str, list[Path]] = {}
    for task in tasks:
        plots[task.name] = plot_task(task, folder) if any(r.status == "ok" for r in task.rows) else []
        images = [f"![{p.stem}]({p.name})" for p in plots[task.name]]
        budget = f"Budget: {task.budget}. Learning rate chosen by validation {task.metric}."
        md += [f"## {task.name}: {task.title}", "", budget, "", markdown_table(task), "", *images, ""]
        body.append(f"<h2>{html.escape(task.name)}: {html.escape(task.title)}</h2>\n<p>{html.escape(budget)}</p>\n"
                    f"{html_table(task)}\n"
                    + "".join(f'<img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">' for p in plots[task.name]))
    paths = {"markdown": folder / "report.md", "html": folder / "report.html", "json": folder / "results.json"}
    write_atomically(paths["markdown"], "\n".join(md))
    header_html = "".join(f"<p>{html.escape(line)}</p>\n" for line in header if line)
    write_atomically(paths["html"], "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>peftkit bench</title>"
                     "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}"
                     "td{text-align:right}</style></head>\n<body><h1>peftkit bench</h1>\n" + header_html
                     + "\n".join(body) + "\n</body></html>\n")
    results = {"header": header, "tasks": [asdict(t) for t in tasks]}
    write_atomically(paths["json"], json.dumps(results, indent=1))
    return {**paths, "plots": [p for task_plots in plots.values() for p in task_plots]}
