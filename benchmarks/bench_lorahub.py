"""LoRAHub on BBC News: four LoRAs trained on topic pairs, composed for a pair none of them saw, from 16 examples.

Four LoRAs (r=8, alpha=16 on query/value, each with its own trained copy of the 5-way classifier head) train on
MiniLM-L6 from the same start, each on the articles of one topic pair among the tests' BBC subset (the first 320
training articles shuffled with seed 0, 32 tokens each; lr 1e-2, 4 epochs, batches of 16, CPU, fp32): business vs
entertainment, politics vs sport, business vs tech, entertainment vs sport. The new task is politics vs tech: 16
training articles of those two topics (8 each, drawn with the draw's seed) are LoRAHub's examples, its loss the
cross-entropy over the pair's two logits; the held-out score is the accuracy on every test article of the pair (of
the 200-article test subset), as a choice between the two topics. Each draw compares the uniform average
(w_i = 1/4) with LoRAHub's search (budget 40, seeded with the draw), for both compositions: the paper's factor mix
(A = Σ w_i A_i, B = Σ w_i s_i B_i) and the exact weighted sum of the weight changes.

    PYTHONPATH=src python benchmarks/bench_lorahub.py            # a few minutes on 2 CPU cores
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' BBC subset, bench_merge's pair adapters

import peftkit  # noqa: E402
from peftkit.compose import lorahub  # noqa: E402
from peftkit.compose.lorahub import FactorMix  # noqa: E402
from peftkit.compose.merge import AdapterMerge  # noqa: E402
from peftkit.train import TaskData  # noqa: E402
from benchmarks.bench_merge import pair_accuracy, task_rows, train_tasks  # noqa: E402
from tests.bbc import bbc_data  # noqa: E402

UPSTREAM = {"business_entertainment": (0, 1), "politics_sport": (2, 3), "business_tech": (0, 4),
            "entertainment_sport": (1, 3)}  # label ids of data.labels
NEW_TASK = (2, 4)  # politics vs tech
SHOTS, DRAWS, BUDGET = 8, (0, 1, 2), 40


def inputs_of(split: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in split.items() if k != "labels"}


def pair_loss(model: nn.Module, batch: tuple[dict[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the new task's two logits (label 0: its first topic)."""
    inputs, labels = batch
    return nn.functional.cross_entropy(model(**inputs).logits[:, list(NEW_TASK)], labels)


def few_shot(data: TaskData, seed: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """SHOTS training articles of each topic of the new task, drawn with `seed`, as one batch."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.cat([(data.train["labels"] == topic).nonzero().flatten()[
        torch.randperm(int((data.train["labels"] == topic).sum()), generator=generator)[:SHOTS]] for topic in NEW_TASK])
    labels = (data.train["labels"][rows] == NEW_TASK[1]).long()
    return [(inputs_of(data.train, rows), labels)]


def scored(model: nn.Module, data: TaskData, merge: AdapterMerge, weights: list[float]) -> float:
    merge.attach("scored", weights)
    accuracy = pair_accuracy(model, data, NEW_TASK)
    peftkit.remove(model, "scored")
    return accuracy


def main() -> None:
    torch.manual_seed(0)
    data = bbc_data()
    model = train_tasks(data, UPSTREAM)
    names = list(UPSTREAM)
    print(f"new task {data.labels[NEW_TASK[0]]} vs {data.labels[NEW_TASK[1]]}: "
          f"{len(task_rows(data.eval, NEW_TASK))} held-out articles")
    for name in names:
        peftkit.activate(model, name)
        print(f"{name + ' alone':<36}{pair_accuracy(model, data, NEW_TASK):.3f}")
    mixes = {"factors": FactorMix(model, names), "deltas": AdapterMerge(model, names, "cat")}
    for mixing, merge in mixes.items():
        uniform = scored(model, data, merge, [1 / len(names)] * len(names))
        print(f"{'uniform average (' + mixing + ')':<36}{uniform:.3f}")
    for mixing in mixes:
        for optimizer in ("ngopt", "cma"):
            for seed in DRAWS:
                start = time.perf_counter()
                result = lorahub(model, names, few_shot(data, seed), pair_loss, budget=BUDGET, seed=seed,
                                 optimizer=optimizer, mixing=mixing, new_name="hub")
                seconds = time.perf_counter() - start
                weights = ", ".join(f"{w:+.2f}" for w in result.weights.values())
                print(f"{f'LoRAHub {mixing} {optimizer} draw {seed}':<36}{pair_accuracy(model, data, NEW_TASK):.3f}   "
                      f"w = [{weights}]  examples' loss {result.best.loss:.3f}  ({seconds:.1f} s)", flush=True)
                peftkit.remove(model, "hub")


if __name__ == "__main__":
    main()
