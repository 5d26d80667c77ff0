"""A tiny BERT classifier and a few dozen short labelled texts, for benchmark protocol tests.

Importing this module registers the model as "bench-tiny-bert" (the bench task files name it under
`imports`, so a fresh worker process registers it too).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from peftkit.train import register_model

TOPICS = {"sport": ["match", "goal", "team", "coach", "league", "striker"],
          "money": ["bank", "shares", "profit", "market", "rates", "budget"]}


@lru_cache(maxsize=1)
def tokenizer():
    from peftkit.models import load_minilm

    return load_minilm()[1]


def tiny_bert(num_labels: int | None) -> tuple[BertForSequenceClassification, object]:
    config = BertConfig(vocab_size=tokenizer().vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=num_labels or 2)
    return BertForSequenceClassification(config), tokenizer()


register_model("bench-tiny-bert", tiny_bert, head=("classifier",))


def write_task(folder: Path, steps: int = 4) -> Path:
    """Write train/test JSONL files and a bench task file using them; return the task file."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 48), ("test", 16)):
        rows = []
        for i in range(count):
            label = list(TOPICS)[i % 2]
            words = [TOPICS[label][int(j)] for j in torch.randint(0, 6, (5,), generator=generator)]
            rows.append({"text": " ".join(words), "label": label})
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    budget = {"steps": steps, "batch_size": 8, "train_rows": None, "val_rows": 8, "test_rows": None, "max_length": 16}
    task = {"name": "tiny-topics", "title": "tiny BERT on word-bag topics", "task": "classify-text",
            "model": {"name": "bench-tiny-bert"}, "family": "bert", "imports": ["tests.bench_tiny"], "metric": "accuracy",
            "data": {"train": str(folder / "train.jsonl"), "eval": str(folder / "test.jsonl"), "labels": list(TOPICS)},
            "budget": {"quick": budget, "full": budget}}
    path = folder / "tiny-task.yaml"
    path.write_text(json.dumps(task))
    return path
