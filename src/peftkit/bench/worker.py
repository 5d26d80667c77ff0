"""One benchmark cell: load the task's model and data, set up the method, train with the peftkit
trainer, and measure (scores, parameters, saved size, peak memory, throughput, inference overhead).

`isolated_runner` runs each cell in a fresh process forked from a server that has already imported
torch and peftkit, so a cell's peak memory is its own and a crash costs only that cell.
"""
from __future__ import annotations

import importlib
import math
import multiprocessing
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import peftkit
from ..core.config import config_from_dict
from ..train import Callback, Trainer, TASKS, Rows, Task, TaskData, config_from_mapping
from ..train.config import DataSection, ModelSection
from ..train.full import save_full, train_base
from ..train.tasks import num_rows
from ..train.trainer import training_context
from .measure import overhead_ratios, parameter_counts, peak_memory, saved_bytes
from .methods import FULL, REFERENCE
from .tasks import Budget

ADAPTER = "bench"
DATA_SEED = 0  # the data (subset, validation split) is the same for every seed: seeds vary training only


@dataclass
class Setup:
    """A model made ready for one backend: what to train with, how to save it, how to time it."""

    callbacks: list[Callback]
    save: Callable[[Path], object]
    base: Callable[[], AbstractContextManager] | None  # None: the model is the base architecture (ratios 1)
    merged: Callable[[], AbstractContextManager] | None  # None: cannot merge


def split_rows(rows: Rows, held_out: int) -> tuple[Rows, Rows]:
    """(train, validation) rows: a fixed random `held_out` rows for validation, the rest for training."""
    n = num_rows(rows)
    if not 0 < held_out < n:
        raise ValueError(f"cannot hold out {held_out} validation rows of {n} training rows")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(DATA_SEED))
    return {k: v[order[held_out:]] for k, v in rows.items()}, {k: v[order[:held_out]] for k, v in rows.items()}


@torch.inference_mode()
def score(task: Task, model: nn.Module, rows: Rows, metrics: list[str], batch_size: int = 32) -> dict[str, float]:
    """The task's metrics on `rows`: loss per unit, accuracy, and for chat the exact match of whole answers.

    An answer matches exactly when every answer token is the argmax given the true prefix: precisely
    when greedy decoding would reproduce it, computed without generating.
    """
    model.eval()
    captured: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda module, args, output: captured.append(output.logits)) \
        if "exact_match" in metrics else None
    loss = units = correct = matched = 0.0
    try:
        for idx in torch.arange(num_rows(rows)).split(batch_size):
            batch = task.collate(rows, idx)
            stats = task.row_stats(model, batch)
            loss, units = loss + stats.loss_sum.sum().item(), units + stats.units.sum().item()
            correct += stats.correct.sum().item() if stats.correct is not None else 0
            if hook is not None:
                length = batch["labels"].size(1)  # virtual tokens (prompt tuning) come before the real ones
                targets, guesses = batch["labels"][:, 1:], captured.pop()[:, -length:].argmax(-1)[:, :-1]
                matched += ((guesses == targets) | (targets == -100)).all(1).sum().item()
    finally:
        if hook is not None:
            hook.remove()
    found = {"loss": loss / max(units, 1.0), "accuracy": correct / num_rows(rows),
             "exact_match": matched / num_rows(rows)}
    return {m: found[m] for m in metrics}


@contextmanager
def _peftkit_merged(model: nn.Module) -> Iterator[None]:
    peftkit.merge(model, ADAPTER)
    try:
        yield
    finally:
        peftkit.unmerge(model, ADAPTER)


def _can_merge(model: nn.Module) -> bool:
    try:
        with _peftkit_merged(model):
            return True
    except ValueError:  # a non-linear method (bottleneck adapters) or a host that refuses (SSF without bias)
        return False


def _setup_peftkit(spec: dict[str, Any], model: nn.Module, head: list[str], task: Task, train: Rows,
                   budget: Budget) -> Setup:
    """Attach the method with the task head as a trained copy; take its own training steps (a selection runs now)."""
    config = config_from_dict({**spec["config"], "modules_to_save": head}).fill_from_run(budget.steps)
    peftkit.attach(model, config, name=ADAPTER)
    context = training_context(model, ADAPTER, budget.steps, task, train, budget.batch_size, DATA_SEED)
    return Setup(config.training_steps(context), lambda folder: peftkit.save(model, folder, name=ADAPTER),
                 lambda: peftkit.disabled(model), None)


def _setup_reference(spec: dict[str, Any], model: nn.Module, head: list[str]) -> Setup:
    """Full fine-tuning trains everything; the linear probe only the task head. Both save what they train
    (as `peftkit train`'s `method: full` does)."""
    modules = None if spec["method"] == FULL else head
    if modules == []:
        raise ValueError("a linear probe needs a task head, and this model has none")
    train_base(model, modules)
    return Setup([], lambda folder: save_full(model, folder, modules), None, None)


class _PeftAdaLoRA(Callback):
    """peft's own AdaLoRA rank allocation, at the same point of the step as peftkit's."""

    def on_step_end(self, trainer) -> None:
        trainer.model.base_model.update_and_allocate(trainer.step)


def _setup_peft(spec: dict[str, Any], model: nn.Module, head: list[str]) -> tuple[nn.Module, Setup]:
    import peft

    ours = config_from_dict({**spec["config"], "modules_to_save": head})
    wrapped = peft.get_peft_model(model, peft.get_peft_config({**ours.to_peft(), "inference_mode": False}))

    @contextmanager
    def merged() -> Iterator[None]:
        wrapped.merge_adapter()
        try:
            yield
        finally:
            wrapped.unmerge_adapter()

    callbacks = [_PeftAdaLoRA()] if spec["method"] == "adalora" else []
    return wrapped, Setup(callbacks, wrapped.save_pretrained, wrapped.disable_adapter, merged)


def _train_config(spec: dict[str, Any], data: dict[str, Any], budget: Budget, seed: int, epochs: int, folder: str):
    """The trainer's config for a cell: the budget's steps and batch, the cell's lr, no files kept."""
    # A reference row trains the base's own parameters (`method: full`; a linear probe froze all but its head).
    method = spec["config"] if spec["backend"] != REFERENCE else {"method": "full"}
    return config_from_mapping({
        "task": spec["task"]["task"], "model": spec["task"]["model"], "data": data, "method": method,
        "adapter_name": ADAPTER, "optimizer": {"name": "adamw", "lr": spec["lr"]},
        "schedule": {"epochs": epochs, "max_steps": budget.steps, "batch_size": budget.batch_size},
        "eval": {"before": False, "restore_best": False}, "output": {"dir": folder, "plot": False, "save": False},
        "seed": seed, "progress": False,
    })


def _measure(spec: dict[str, Any], seed: int) -> dict[str, Any]:
    for module in spec["task"]["imports"]:
        importlib.import_module(module)
    budget, metrics = Budget(**spec["budget"]), spec["task"]["metrics"]
    data = {**spec["task"]["data"], "max_length": budget.max_length, "image_size": budget.image_size,
            "train_limit": budget.train_rows, "eval_limit": budget.test_rows}
    task, model_section = TASKS[spec["task"]["task"]](), ModelSection(**spec["task"]["model"])
    raw = task.read_data(DataSection(**data), DATA_SEED)
    torch.manual_seed(seed)  # the task head's and the adapter's initialisation
    model, processor = task.load_model(model_section, raw)
    encoded = task.encode(raw, processor, DataSection(**data))
    train, validation = split_rows(encoded.train, budget.val_rows)
    head = task.head_modules(model_section)
    if spec["backend"] == REFERENCE:
        setup = _setup_reference(spec, model, head)
    elif spec["backend"] == "peft":
        model, setup = _setup_peft(spec, model, head)
    else:
        setup = _setup_peftkit(spec, model, head, task, train, budget)
    trainable, total = parameter_counts(model)
    with peak_memory() as peak, tempfile.TemporaryDirectory(prefix="peftkit-bench-cell-") as folder:
        epochs = math.ceil(budget.steps / math.ceil(num_rows(train) / budget.batch_size))
        config = _train_config(spec, data, budget, seed, epochs, folder)
        trainer = Trainer(model, task, TaskData(train, None, encoded.labels), config, setup.callbacks, processor)
        start = time.perf_counter()
        trainer.fit()
        seconds, steps = time.perf_counter() - start, trainer.step
    scores = {"val": score(task, model, validation, metrics), "test": score(task, model, encoded.eval, metrics)}
    if setup.merged is None and spec["backend"] == "peftkit" and _can_merge(model):
        setup.merged = lambda: _peftkit_merged(model)
    timing_batch = task.collate(encoded.eval, torch.arange(min(budget.batch_size, num_rows(encoded.eval))))
    ratios = {"unmerged": 1.0, "merged": 1.0}
    if setup.base is not None:
        variants = {"base": setup.base, "unmerged": nullcontext, **({"merged": setup.merged} if setup.merged else {})}
        model.eval()
        ratios = overhead_ratios(lambda: task.row_stats(model, timing_batch), variants, spec["timing_rounds"])
    return {"status": "ok", "seed": seed, "spec": spec, **scores,
            "trainable": trainable, "total": total, "saved_bytes": saved_bytes(setup.save),
            "peak_bytes": peak.bytes, "steps": steps, "train_seconds": seconds,
            "samples_per_s": steps * budget.batch_size / seconds,
            "unmerged": ratios["unmerged"], "merged": ratios.get("merged")}


def run_cell(spec: dict[str, Any], seed: int) -> dict[str, Any]:
    """Run one cell in this process; an error becomes a failed result that names it (the row shows it)."""
    try:
        return _measure(spec, seed)
    except Exception as err:  # any method or task error: report it in the row, go on with the others
        traceback.print_exc()
        where = traceback.extract_tb(err.__traceback__)[-1]  # a bare `assert` in a library says nothing else
        return {"status": "failed", "error": f"{type(err).__name__}: {err}" if str(err).strip() else
                f"{type(err).__name__} in {Path(where.filename).name}:{where.lineno} ({where.line})"}


def _child(spec: dict[str, Any], seed: int, connection) -> None:
    connection.send(run_cell(spec, seed))
    connection.close()


def isolated_runner() -> Callable[[dict[str, Any], int], dict[str, Any]]:
    """A cell runner that runs every cell in a fresh process (forked from a server with peftkit imported)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])

    def run(spec: dict[str, Any], seed: int) -> dict[str, Any]:
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_child, args=(spec, seed, sender), daemon=True)
        process.start()
        sender.close()
        try:
            result = receiver.recv()
        except EOFError:  # the worker died without answering (killed for memory, a crash in native code)
            result = {"status": "failed", "error": f"worker process died (exit code {process.exitcode})"}
        process.join()
        return result

    return run
