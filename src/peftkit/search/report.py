"""What a search leaves in its output folder: every draw (trials.csv, trials.json), the Pareto front of trainable
parameters against the validation score (pareto.md, pareto.png), and the best design as a config `peftkit train`
runs (best.yaml). Each file is written whole or not at all.

A candidate is on the front when no other has at most its parameters and at least its score, one of them strictly
better. The best is the highest score (ties: fewer parameters, then the earlier trial); it is on the front.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..bench.cache import write_atomically
from ..train import config_from_mapping


@dataclass(frozen=True)
class TrialRecord:
    """One finished draw: trained, a repeat of an earlier design, over the budget, or empty (pruned)."""

    number: int
    outcome: str  # trained | repeat | over_budget | empty
    label: str  # the design's searched choices
    design: dict[str, Any] | None  # its method config
    trainable: int | None  # trainable parameters, the task head included
    metrics: dict[str, float] = field(default_factory=dict)  # on the validation rows
    seconds: float | None = None  # its training steps
    same_as: int | None = None  # a repeat: the trial that trained this design

    @classmethod
    def of(cls, trial: Any) -> "TrialRecord":
        attrs = trial.user_attrs
        return cls(trial.number, attrs["outcome"], attrs.get("label", "(empty)"), attrs.get("design"),
                   attrs.get("trainable"), attrs.get("metrics", {}), attrs.get("seconds"), attrs.get("same_as"))


@dataclass
class SearchReport:
    records: list[TrialRecord]
    metric: str
    budget: int | None
    seed: int
    val_rows: int
    model: str
    data: str
    paths: dict[str, Path] = field(default_factory=dict)  # filled by write_reports

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "loss"

    @property
    def metric_names(self) -> list[str]:
        """Every metric the candidates were scored with (the task's: loss, accuracy)."""
        return sorted({m for r in self.candidates for m in r.metrics})

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.records)

    @property
    def candidates(self) -> list[TrialRecord]:
        """The designs trained (a repeat scores a design again, it is no new candidate)."""
        return [r for r in self.records if r.outcome == "trained"]

    def rank(self, record: TrialRecord) -> float:
        """Larger is better."""
        value = record.metrics[self.metric]
        return -value if self.lower_is_better else value

    @property
    def best(self) -> TrialRecord | None:
        return min(self.candidates, key=lambda r: (-self.rank(r), r.trainable, r.number), default=None)

    @property
    def median(self) -> float | None:
        """The median candidate's score."""
        scores = [r.metrics[self.metric] for r in self.candidates]
        return statistics.median(scores) if scores else None

    @property
    def beats_median(self) -> bool:
        """The issue's check: the best design scores strictly better than the median candidate."""
        best, median = self.best.metrics[self.metric], self.median
        return best < median if self.lower_is_better else best > median

    @property
    def pareto(self) -> list[TrialRecord]:
        """The non-dominated candidates, fewest parameters first."""
        front: list[TrialRecord] = []
        for record in sorted(self.candidates, key=lambda r: (r.trainable, -self.rank(r), r.number)):
            if not front or self.rank(record) > self.rank(front[-1]):
                front.append(record)
        return front


def _row(record: TrialRecord, metrics: list[str]) -> list[str]:
    seconds = f"{record.seconds:.1f}" if record.seconds is not None else ""
    return [str(record.number), f"`{record.label}`", f"{record.trainable:,}",
            *(f"{record.metrics[m]:.4f}" for m in metrics), seconds]


def markdown_table(records: list[TrialRecord], metrics: list[str]) -> str:
    head = ["trial", "design", "trainable params", *(f"val {m}" for m in metrics), "train s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    return "\n".join(lines + ["| " + " | ".join(_row(r, metrics)) + " |" for r in records])


def summary(report: SearchReport) -> list[str]:
    """The search in a few lines: what was drawn, the best design against the median candidate."""
    budget = f"{report.budget:,} trainable parameters (the task head included)" if report.budget else "none"
    lines = [f"{report.model} on {report.data}; candidates scored by validation {report.metric} on {report.val_rows} "
             f"rows held out of the training rows; sampler seed {report.seed}; budget: {budget}.",
             f"Draws: {len(report.records)}: {report.count('trained')} designs trained, {report.count('repeat')} drawn "
             f"again (scored from their first training), {report.count('over_budget')} over the budget (pruned before "
             f"training), {report.count('empty')} empty."]
    best, median = report.best, report.median
    if best is not None:
        margin = abs(best.metrics[report.metric] - median)
        lines += [f"Best: trial {best.number}, `{best.label}`: validation {report.metric} "
                  f"{best.metrics[report.metric]:.4f} with {best.trainable:,} trainable parameters (best.yaml).",
                  f"Median candidate: validation {report.metric} {median:.4f} over {len(report.candidates)} designs; "
                  + (f"the best beats it by {margin:.4f}." if report.beats_median else "the best does not beat it.")]
    return lines


def plot(report: SearchReport) -> bytes:
    """Validation score against trainable parameters (log x): every candidate, the front, the best, the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    others = [r for r in report.candidates if r not in report.pareto]
    ax.scatter([r.trainable for r in others], [r.metrics[report.metric] for r in others], color="0.6",
               label="candidate")
    front = report.pareto
    xs, ys = [r.trainable for r in front], [r.metrics[report.metric] for r in front]
    ax.step(xs, ys, where="post", color="C0", alpha=0.6)
    ax.scatter(xs, ys, color="C0", label="Pareto front")
    for record in front:
        ax.annotate(str(record.number), (record.trainable, record.metrics[report.metric]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    best = report.best
    ax.scatter([best.trainable], [best.metrics[report.metric]], marker="*", s=260, color="C3", zorder=3,
               label=f"best (trial {best.number})")
    ax.axhline(report.median, color="0.4", linestyle=":", label=f"median candidate {report.median:.3f}")
    if report.budget is not None:
        ax.axvline(report.budget, color="C2", linestyle="--", label=f"budget {report.budget:,}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale; the task head included)")
    ax.set_ylabel(f"validation {report.metric}")
    ax.set_title(f"peftkit search: {report.model} on {report.data}, {len(report.candidates)} designs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if not report.lower_is_better else "upper right")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    return image.getvalue()


def best_config(report: SearchReport, mapping: dict[str, Any], output: Path) -> dict[str, Any]:
    """The search's training config with the best design as its method, training into OUTPUT/best-run."""
    first = {key: value for key, value in mapping.items() if key in ("task", "model")}  # the method reads best here
    config = {**first, "method": report.best.design, **mapping,
              "output": {**mapping.get("output", {}), "dir": str(output / "best-run")}}
    config_from_mapping(config)  # `peftkit train` must take it as it is
    return config


def write_trials(output: Path, report: SearchReport) -> dict[str, Path]:
    """trials.json and trials.csv: every finished draw so far."""
    metrics = report.metric_names
    paths = {name: output / name for name in ("trials.json", "trials.csv")}
    write_atomically(paths["trials.json"], json.dumps({"metric": report.metric, "budget": report.budget,
                                                       "seed": report.seed,
                                                       "trials": [asdict(r) for r in report.records]}, indent=1))
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["trial", "outcome", "design", "trainable_params", *(f"val_{m}" for m in metrics),
                     "train_seconds", "same_as"])
    for r in report.records:
        writer.writerow([r.number, r.outcome, r.label, r.trainable, *(r.metrics.get(m, "") for m in metrics),
                         "" if r.seconds is None else f"{r.seconds:.2f}", "" if r.same_as is None else r.same_as])
    write_atomically(paths["trials.csv"], table.getvalue())
    return paths


def write_reports(output: Path, report: SearchReport, mapping: dict[str, Any], command: str = "") -> SearchReport:
    """Write every file of the output folder for the draws so far; the report, with their paths."""
    paths = write_trials(output, report)
    report.paths = paths
    if report.best is None:  # nothing trained: no front, no best
        return report
    metrics = report.metric_names
    paths.update({name: output / name for name in ("pareto.md", "pareto.png", "best.yaml")})
    by_score = sorted(report.candidates, key=lambda r: (-report.rank(r), r.trainable, r.number))
    md = ["# peftkit search", "", *([f"Command: `{command}`", ""] if command else []), *summary(report), "",
          f"## Pareto front: fewer trainable parameters, better validation {report.metric}", "",
          markdown_table(report.pareto, metrics), "", "![Pareto front](pareto.png)", "",
          "## Every candidate, best first", "", markdown_table(by_score, metrics), ""]
    write_atomically(paths["pareto.md"], "\n".join(md))
    write_atomically(paths["pareto.png"], plot(report))
    best = report.best
    header = (f"# peftkit search: the best of {len(report.candidates)} designs, trial {best.number} ({best.label}):\n"
              f"# validation {report.metric} {best.metrics[report.metric]:.4f}, {best.trainable:,} trainable "
              f"parameters. Train it: peftkit train {paths['best.yaml']}\n")
    write_atomically(paths["best.yaml"], header + yaml.safe_dump(best_config(report, mapping, output), sort_keys=False))
    return report

