"""A trained adapter (or full fine-tune) used again with its training config: `peftkit eval` scores a split,
`peftkit predict` labels texts or images, or answers prompts. The config gives the model, the task and the data (for a
classifier, its label names); the directory gives the trained weights, loaded strictly.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import load
from ..core.io import read_adapter
from .config import TrainConfig, TrainConfigError
from .full import is_full, load_full
from .tasks import TASKS, RawData, Task, num_rows
from .trainer import _resolve_bf16, _resolve_device, score_sums, split_metrics


def saved_method(path: str | os.PathLike) -> str:
    """The method of the adapter (or full fine-tune) saved in directory `path`, from its files."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    return "full" if is_full(path) else read_adapter(path)[0].method


def load_trained(config: TrainConfig, path: str | os.PathLike, task: Task) -> tuple[nn.Module, Any, RawData]:
    """(model, processor, data read as the config says) with the weights saved at `path` loaded, in eval mode
    on the config's device. The saved method must be the config's: another one means another run's config."""
    saved, wanted = saved_method(path), config.method.method
    if saved != wanted:
        what = "full fine-tune" if saved == "full" else f"{saved} adapter"
        raise TrainConfigError(f"{path} holds a {what}, but the config's method is {wanted}: "
                               "pass the config it was trained with")
    torch.manual_seed(config.seed)  # as in training: a freshly initialised part the file lacks is the same
    raw = task.read_data(config.data, config.seed)
    model, processor = task.load_model(config.model, raw)
    if saved == "full":
        load_full(model, path)
    else:
        load(model, path)
    return model.to(_resolve_device(config.device)).eval(), processor, raw


def evaluate_saved(config: TrainConfig, path: str | os.PathLike, split: str = "eval",
                   progress: bool = True) -> tuple[dict[str, float], int]:
    """(metrics, rows) of the weights saved at `path` on the config's `split` ("eval" or "test")."""
    task = TASKS[config.task]()
    model, processor, raw = load_trained(config, path, task)
    rows = getattr(task.encode(raw, processor, config.data), split)
    if rows is None:
        hint = "data.eval or data.eval_fraction" if split == "eval" else "data.test"
        raise TrainConfigError(f"the config has no {split} split: set {hint}")
    device = next(model.parameters()).device
    bf16 = _resolve_bf16(config.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    batches = list(torch.arange(num_rows(rows)).split(config.eval.batch_size))
    sums = score_sums(task, model, lambda idx: {k: v.to(device) for k, v in task.collate(rows, idx).items()},
                      batches, autocast, progress, desc=split)
    return split_metrics(task, *sums, num_rows(rows)), num_rows(rows)


def predict_saved(config: TrainConfig, path: str | os.PathLike, inputs: str | os.PathLike,
                  max_new_tokens: int = 64) -> list[dict[str, Any]]:
    """One record per input of `inputs` (a file; for images also a folder): a classifier's label and probabilities,
    or a chat model's answer."""
    task = TASKS[config.task]()
    saved_method(path)  # a missing directory is named before the inputs are read
    items = task.predict_inputs(Path(inputs), config.data)
    model, processor, raw = load_trained(config, path, task)
    return task.predict(model, processor, items, config.data, raw.labels, max_new_tokens)
