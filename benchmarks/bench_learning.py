"""Do the flagship PEFT methods learn as well as full fine-tuning? `peftkit train`'s engine alone, on all of BBC News.

MiniLM-L6 on the bundled BBC News topics (5 classes; the 2,127 distinct articles, stratified): the bundled train
split is cut into train and validation rows, the bundled test split is the test set. Each method (full
fine-tuning, LoRA on query/value and on every Linear, Pfeiffer / parallel / Houlsby bottleneck adapters, FishMask)
is trained through `run_training` (what `peftkit train CONFIG` runs) at max length 128 for 2 epochs, at each
learning rate of its small grid (3 values around the method's usual range; full fine-tuning's is lower). The best
epoch and the best learning rate are chosen on the validation rows; the
test rows are scored once, with that choice, so the reported accuracy is not picked on the rows it is measured on.

    python benchmarks/bench_learning.py                  # everything (about two hours on 2 quiet CPU cores)
    python benchmarks/bench_learning.py --quick          # 200 training rows, 1 epoch, one lr each: a smoke run
    python benchmarks/bench_learning.py --methods lora full

Results are cached per run under OUTPUT/runs/<method>-<lr>/result.json (an interrupted run resumes); the report
(OUTPUT/report.md, results.json) has one row per run and a summary per method: chosen lr, validation and test
accuracy, the gap to full fine-tuning on the test rows, trainable parameters and training time.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from peftkit.data import load_bbc_news
from peftkit.train import run_training

QV = ["query", "value"]
METHODS: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {  # config, learning-rate grid
    "full": ({"method": "full"}, (2e-5, 5e-5, 1e-4)),
    "lora": ({"method": "lora", "r": 8, "alpha": 16, "targets": QV}, (1e-3, 3e-3, 1e-2)),
    "lora-all-linear": ({"method": "lora", "r": 8, "alpha": 16, "targets": "all-linear", "exclude": ["classifier"]},
                        (5e-4, 1e-3, 3e-3)),
    "bottleneck": ({"method": "bottleneck", "preset": "pfeiffer", "targets": ["output.dense"],
                    "exclude": ["attention.output.dense"]}, (3e-4, 1e-3, 3e-3)),
    "bottleneck-houlsby": ({"method": "bottleneck", "preset": "houlsby"}, (3e-4, 1e-3, 3e-3)),
    "bottleneck-parallel": ({"method": "bottleneck", "preset": "parallel"}, (3e-4, 1e-3, 3e-3)),
    "fishmask": ({"method": "fishmask", "fraction": 0.005, "targets": "all-linear", "exclude": ["classifier"]},
                 (1e-3, 3e-3, 1e-2)),
}
VALIDATION_ROWS = 200


def write_splits(folder: Path, train_rows: int | None) -> dict[str, str]:
    """The bundled BBC splits as CSV files: train minus VALIDATION_ROWS (seeded), validation, test."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = load_bbc_news(seed=0)
    train = splits["train"].shuffle(seed=0)
    names = splits["train"].features["label"].names
    parts = {"train": train.select(range(VALIDATION_ROWS, len(train))), "val": train.select(range(VALIDATION_ROWS)),
             "test": splits["test"]}
    if train_rows is not None:
        parts["train"] = parts["train"].select(range(train_rows))
    paths = {}
    for name, rows in parts.items():
        paths[name] = str(folder / f"{name}.csv")
        with open(paths[name], "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows((text, names[label]) for text, label in zip(rows["text"], rows["label"]))
    return paths


def run_one(method: str, lr: float, paths: dict[str, str], folder: Path, epochs: int) -> dict[str, Any]:
    """One training run (cached in folder/result.json)."""
    cached = folder / "result.json"
    if cached.exists():
        return json.loads(cached.read_text())
    config = {
        "task": "classify-text", "model": {"name": "minilm"}, "method": METHODS[method][0],
        "data": {"train": paths["train"], "eval": paths["val"], "test": paths["test"], "max_length": 128},
        "optimizer": {"name": "adamw", "lr": lr}, "schedule": {"epochs": epochs, "batch_size": 16},
        "eval": {"before": False, "restore_best": True}, "output": {"dir": str(folder), "plot": False},
        "seed": 0, "progress": False,
    }
    start = time.perf_counter()
    result = run_training(config)
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    record = {"method": method, "lr": lr, "val": result.after["accuracy"], "test": result.test["accuracy"],
              "best_epoch": result.best["epoch"] if result.best else None, "steps": result.steps,
              "train_seconds": result.train_seconds, "wall_seconds": time.perf_counter() - start,
              "trainable": trainable, "total": sum(p.numel() for p in result.model.parameters())}
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # full fine-tuning checkpoints are large
    cached.write_text(json.dumps(record, indent=1))
    return record


def summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the run with the best validation accuracy (ties: the lower lr), and its gap to full FT on test."""
    best = {}
    for record in sorted(records, key=lambda r: r["lr"]):
        if record["method"] not in best or record["val"] > best[record["method"]]["val"]:
            best[record["method"]] = record
    full = best.get("full")
    return [{**record, "gap": None if full is None else record["test"] - full["test"]} for record in best.values()]


def report(records: list[dict[str, Any]], command: str) -> str:
    lines = [f"{datetime.date.today()} · `{command}` · torch {torch.__version__}, {torch.get_num_threads()} threads",
             "", "| method | chosen lr | val acc | test acc | test − full FT | trainable | train s |",
             "|---|---|---|---|---|---|---|"]
    for row in summary(records):
        gap = "—" if row["gap"] is None or row["method"] == "full" else f"{100 * row['gap']:+.1f} pt"
        lines.append(f"| {row['method']} | {row['lr']:g} | {row['val']:.3f} | {row['test']:.3f} | {gap} | "
                     f"{row['trainable']:,} ({100 * row['trainable'] / row['total']:.2f}%) | {row['train_seconds']:.0f} |")
    lines += ["", "Every run (validation picks the epoch and the lr; test is scored once per run):", "",
              "| method | lr | val acc | test acc | best epoch | train s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['lr']:g} | {r['val']:.3f} | {r['test']:.3f} | {r['best_epoch']} | "
              f"{r['train_seconds']:.0f} |" for r in records]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 training rows, 1 epoch, each method's first lr")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--output", type=Path, default=Path("runs/bench-learning"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    output = args.output / ("quick" if args.quick else "full")
    paths = write_splits(output / "data", 200 if args.quick else None)
    records = []
    for method in args.methods:
        for lr in METHODS[method][1][:1 if args.quick else None]:
            record = run_one(method, lr, paths, output / "runs" / f"{method}-{lr:g}", 1 if args.quick else 2)
            print(f"{method:10s} lr {lr:g}: val {record['val']:.3f} test {record['test']:.3f} "
                  f"({record['train_seconds']:.0f} s)", flush=True)
            records.append(record)
    command = "python benchmarks/bench_learning.py" + (" --quick" if args.quick else "")
    (output / "results.json").write_text(json.dumps(records, indent=1))
    (output / "report.md").write_text(report(records, command))
    print(report(records, command))


if __name__ == "__main__":
    main()
