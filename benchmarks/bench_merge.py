"""Merging two task adapters trained on disjoint BBC News topic pairs: each task's held-out accuracy before and after.

Two LoRAs (r=8, alpha=16 on query/value, each with its own trained copy of the 5-way classifier head) train on
MiniLM-L6 from the same start, one on business-vs-sports articles, one on politics-vs-tech (the first 320 training
articles of the tests' BBC subset, shuffled with seed 0, 32 tokens each; lr 1e-2, 4 epochs, batches of 16, CPU,
fp32). Each task is scored on its own held-out articles of the 200-article test subset (98 and 70), as a choice
between its two topics (argmax over those two logits). Then `peftkit.merge_adapters` merges the two adapters (their
head copies too, as task vectors) by each method, and both tasks are scored on the one merged adapter.

    PYTHONPATH=src python benchmarks/bench_merge.py            # ~10 minutes on 2 busy CPU cores
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/bbc.py: the tests' BBC subset and trainer

import peftkit  # noqa: E402
from peftkit.compose import merge_adapters  # noqa: E402
from peftkit.models import load_minilm  # noqa: E402
from peftkit.train import TaskData  # noqa: E402
from tests.bbc import bbc_config, bbc_data, train_attached  # noqa: E402

TASKS = {"business_sports": (0, 3), "politics_tech": (2, 4)}  # label ids of data.labels
MERGES = [  # (label, method, weights, options)
    ("linear (PEFT factors) 0.5 each", "linear", 0.5, {}),
    ("cat = task arithmetic, 1 each", "cat", 1.0, {}),
    ("cat = average, 0.5 each", "cat", 0.5, {}),
    ("svd r=8, 1 each", "svd", 1.0, {"rank": 8}),
    ("ties d=0.5, 1 each", "ties", 1.0, {"density": 0.5}),
    ("dare_ties d=0.5, 1 each", "dare_ties", 1.0, {"density": 0.5, "seed": 0}),
    ("dare_linear d=0.5, 0.5 each", "dare_linear", 0.5, {"density": 0.5, "seed": 0}),
    ("magnitude_prune d=0.5, 1 each", "magnitude_prune", 1.0, {"density": 0.5}),
]


def task_rows(split: dict[str, torch.Tensor], pair: tuple[int, int]) -> torch.Tensor:
    return torch.isin(split["labels"], torch.tensor(pair)).nonzero().flatten()


@torch.inference_mode()
def pair_accuracy(model: nn.Module, data: TaskData, pair: tuple[int, int]) -> float:
    """Accuracy on the task's held-out articles, choosing between its two topics."""
    rows = task_rows(data.eval, pair)
    model.eval()
    logits = model(**{k: v[rows] for k, v in data.eval.items() if k != "labels"}).logits[:, list(pair)]
    return float((torch.tensor(pair)[logits.argmax(-1)] == data.eval["labels"][rows]).float().mean())


def train_tasks(data: TaskData, tasks: dict[str, tuple[int, int]] = TASKS) -> nn.Module:
    """MiniLM with one trained adapter per task (frozen once trained)."""
    model, _ = load_minilm(num_labels=len(data.labels))
    for name, pair in tasks.items():
        config = peftkit.LoRA(r=8, alpha=16, targets=["query", "value"], modules_to_save=["classifier"])
        peftkit.attach(model, config, name=name)
        rows = task_rows(data.train, pair)
        subset = TaskData({k: v[rows] for k, v in data.train.items()}, data.eval, data.labels)
        start = time.perf_counter()
        run = train_attached(model, bbc_config(config, lr=1e-2, epochs=4, adapter_name=name), subset)
        peftkit.set_trainable(model, name, False)
        print(f"trained {name} on {len(rows)} articles: {run.steps} steps in {time.perf_counter() - start:.0f} s",
              flush=True)
    return model


def main() -> None:
    torch.manual_seed(0)
    data = bbc_data()
    model = train_tasks(data)
    header = f"{'adapter':<34}" + "".join(f"{name:>17}" for name in TASKS)
    print(header)
    for name in TASKS:
        peftkit.activate(model, name)
        print(f"{name + ' alone':<34}" + "".join(f"{pair_accuracy(model, data, p):>17.3f}" for p in TASKS.values()))
    for label, method, weight, options in MERGES:
        start = time.perf_counter()
        merge_adapters(model, {name: weight for name in TASKS}, method=method, new_name="merged", **options)
        seconds = time.perf_counter() - start
        scores = "".join(f"{pair_accuracy(model, data, p):>17.3f}" for p in TASKS.values())
        print(f"{label:<34}{scores}   (merge {seconds:.2f} s)", flush=True)
        peftkit.remove(model, "merged")


if __name__ == "__main__":
    main()
