"""The training engine: one optimizer step for one or several adapters over one model.

Everything that trains goes through `Engine.step`: `peftkit train` and `run_training` (one run, the
micro-batches of a gradient-accumulation group), `MultiJobTrainer` (several runs, their batches packed
into shared forward passes with each row routed to its run's adapter), both under data parallelism
(a `sync` that sums over processes), and the benchmark. One step is

    per forward pass: backward of Σ loss sums of its rows   (a run's micro-batches go in separate passes)
    per run: gradients ÷ its units (rows, or answer tokens) + its extra loss (a method's regulariser),
             summed over processes, clipped, optimizer step, the run's step hooks, schedule step, zero_grad

so each run gets the gradient of its own mean loss over its whole group, as if its batches were one
batch trained alone. A run whose optimizer is MeZO (`train.mezo`) takes a zeroth-order step instead: the same
passes twice under no_grad, at θ + εz and θ − εz, and its optimizer steps by the projected gradient. A run's hooks
are `core.training.TrainingStep`s: the method's own steps first, then the user's callbacks.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import routed
from ..core.registry import REGISTRY_ATTR
from ..core.training import TrainingStep
from .mezo import MeZO
from .tasks import ModelInputs, RowStats, Task, model_logits


SELECTION_BATCHES = 4  # training batches a method's selection on data (Fisher) looks at before training


def selection_indices(rows: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The rows of the first SELECTION_BATCHES batches of the first epoch's order (a `seed`-drawn permutation, as
    every entry point draws it): what a method's selection on data sees."""
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    return list(order.split(batch_size)[:SELECTION_BATCHES])


def param_groups(model: nn.Module, adapter: str, lr: float, params: list[nn.Parameter]) -> list[Any]:
    """Optimizer groups for `params`: the attached method's (LoRA+'s faster B), with the trainable parameters they
    leave out in a group of their own; `params` as they are when the method has none (or no adapter is attached)."""
    registry = model.__dict__.get(REGISTRY_ATTR)
    method = registry.configs.get(adapter) if registry is not None else None
    groups = method.optimizer_groups(model, adapter, lr) if method is not None else None
    if groups is None:
        return params
    grouped = {id(p) for group in groups for p in group["params"]}
    rest = [p for p in params if id(p) not in grouped]
    return [*groups, {"params": rest}] if rest else groups


def scale_lr(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """Multiply every group's learning rate by `scale` (before a schedule reads them)."""
    for group in optimizer.param_groups:
        group["lr"] *= scale


class TrainingError(ValueError):
    """Training that cannot go on as asked: a batch with no loss units (no mean loss), runs sharing a parameter, a
    method step the trainer cannot give (a fresh optimizer inside Hugging Face's Trainer)."""


# (logits of the batch's rows, its targets) -> (loss sum per row [B], units per row [B])
BatchLoss = Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]


def task_loss(task: Task) -> BatchLoss:
    """A task's per-row scoring as a batch loss (its targets are the whole batch of rows)."""
    def loss(logits: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        stats: RowStats = task.loss_stats(logits, batch)
        return stats.loss_sum, stats.units
    return loss


@dataclass(eq=False)
class Run:
    """One adapter's optimisation: what the engine steps. `host` is what the hooks get as `trainer`
    (the `Trainer`, a `MultiJobTrainer` job); it reads `model`, `optimizer`, `step`, `total_steps` here."""

    model: nn.Module
    adapter: str | None  # the adapter its rows are routed to in shared passes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    total_steps: int
    hooks: list[TrainingStep] = field(default_factory=list)
    max_grad_norm: float | None = None
    step: int = 0  # optimizer steps taken
    host: Any = None

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def view(self) -> Any:
        return self if self.host is None else self.host


@dataclass(eq=False)
class MicroBatch:
    """A run's rows for one forward pass (only this process's share of them when data-parallel)."""

    run: Run
    inputs: ModelInputs | None  # None: this process has no rows of it
    targets: Any
    rows: int
    loss: BatchLoss

    def signature(self) -> tuple:
        """Micro-batches with equal signatures can share one forward pass (same keys, trailing shapes, dtypes)."""
        if isinstance(self.inputs, torch.Tensor):
            return (tuple(self.inputs.shape[1:]), self.inputs.dtype)
        return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(self.inputs.items()))


class Engine:
    """Takes optimizer steps for runs over `model` (see the module docstring).

    `route`: rows go to their run's adapter through `peftkit.routed` (several runs in one pass);
    otherwise the model runs as it is (one run, its adapter active). `max_rows` caps the rows of one
    forward pass (None: every compatible micro-batch of the same rank in one pass). `sync` sums loss
    statistics and gradients over processes; `autocast()` wraps the forward passes (bf16); `offload`
    keeps the activations saved for backward in CPU memory (`torch.autograd.graph.save_on_cpu`) until backward
    needs them. A run whose optimizer is `MeZO` takes a zeroth-order step instead (`_zeroth_order`)."""

    def __init__(self, model: nn.Module, route: bool = False, max_rows: int | None = None, sync: Any = None,
                 autocast: Callable[[], AbstractContextManager] = nullcontext, is_main: bool = True,
                 offload: bool = False):
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
        self.model, self.route, self.max_rows, self.sync = model, route, max_rows, sync
        self.autocast, self.is_main, self.offload = autocast, is_main, offload

    def step(self, work: list[tuple[Run, list[MicroBatch]]]) -> list[float]:
        """One optimizer step of every run over its micro-batches; returns each run's mean loss per unit."""
        params = [id(p) for run, _ in work for p in run.params]
        if len(params) != len(set(params)):
            raise TrainingError("two runs share a parameter: its gradient would be normalised and stepped twice")
        zeroth = [i for i, (run, _) in enumerate(work) if isinstance(run.optimizer, MeZO)]
        backprop = [i for i in range(len(work)) if i not in zeroth]
        losses = dict(zip(backprop, self._backprop([work[i] for i in backprop])))
        losses.update(zip(zeroth, self._zeroth_order([work[i] for i in zeroth])))
        return [losses[i] for i in range(len(work))]

    def _backprop(self, work: list[tuple[Run, list[MicroBatch]]]) -> list[float]:
        """Forward and backward passes, gradients normalised per run, extra losses, sync, optimizer steps."""
        if not work:
            return []
        stats = self._check_units(work, self._loss_sums(work, backward=True))
        losses = []
        for (run, _), (loss_sum, units) in zip(work, stats.tolist()):
            for p in run.params:  # the backward passes summed the rows' losses: make it the mean
                if p.grad is not None:
                    p.grad.div_(units)
            losses.append(loss_sum / units)
            self._extra_loss(run)
        if self.sync is not None:
            self.sync.grads([p for run, _ in work for p in run.params])
        for run, _ in work:
            if run.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(run.params, run.max_grad_norm)
            self._update(run)
        return losses

    def _zeroth_order(self, work: list[tuple[Run, list[MicroBatch]]]) -> list[float]:
        """MeZO's step for every run at once (`train.mezo`): each run's parameters moved by +εz, forward passes
        (shared between runs as usual), moved by −2εz, the same passes with the same random draws (dropout), then
        each run's update by its projected gradient g = (L+ − L−) / 2ε, its loss being mean loss + extra loss."""
        if not work:
            return []
        draws = _RandomState()
        means = []
        for scale in (1.0, -2.0):
            for run, _ in work:
                run.optimizer.perturb(scale)
            draws.restore()
            try:
                stats = self._check_units(work, self._loss_sums(work, backward=False))
            except BaseException:
                for run, _ in work:  # back from θ ± εz to θ before giving up the step
                    run.optimizer.perturb(-1.0 if scale > 0 else 1.0)
                raise
            means.append([loss_sum / units + self._extra_value(run) for (run, _), (loss_sum, units)
                          in zip(work, stats.tolist())])
        losses = []
        for (run, _), plus, minus in zip(work, *means):
            self._update(run, (plus - minus) / (2 * run.optimizer.eps))  # MeZO's step takes the projected gradient
            losses.append((plus + minus) / 2)
        return losses

    def _loss_sums(self, work: list[tuple[Run, list[MicroBatch]]], backward: bool) -> torch.Tensor:
        """[runs, 2]: each run's loss sum and units over its micro-batches (summed over processes)."""
        stats = torch.zeros(len(work), 2, dtype=torch.float64)
        slot = {id(run): i for i, (run, _) in enumerate(work)}
        for group in self._passes([batches for _, batches in work]):
            for batch, (loss_sum, units) in zip(group, self._forward(group, backward)):
                stats[slot[id(batch.run)]] += torch.tensor([loss_sum, units], dtype=torch.float64)
        return self.sync.sum(stats) if self.sync is not None else stats

    @staticmethod
    def _check_units(work: list[tuple[Run, list[MicroBatch]]], stats: torch.Tensor) -> torch.Tensor:
        for (run, _), (_, units) in zip(work, stats.tolist()):  # before any gradient or parameter is updated
            if units <= 0:
                raise TrainingError(f"adapter {run.adapter!r}: its batch at step {run.step} has no loss units "
                                    "(e.g. every label masked), so its mean loss is undefined")
        return stats

    def _extra_loss(self, run: Run) -> None:
        for hook in run.hooks:
            extra = hook.extra_loss(run.view)
            if extra is not None and self.is_main:  # once: the gradients are summed over processes next
                extra.backward()

    @torch.no_grad()
    def _extra_value(self, run: Run) -> float:
        """The run's extra loss terms at its current (perturbed) parameters: equal in every process."""
        extras = [hook.extra_loss(run.view) for hook in run.hooks]
        return sum(float(extra) for extra in extras if extra is not None)

    @staticmethod
    def _update(run: Run, *step_args: float) -> None:
        optimizer, scheduler = run.optimizer, run.scheduler  # a hook may start new ones: they begin at the next step
        optimizer.step(*step_args)
        run.step += 1
        for hook in run.hooks:
            hook.on_step_end(run.view)
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def _passes(self, per_run: list[list[MicroBatch]]) -> Iterator[list[MicroBatch]]:
        """Forward passes: the k-th micro-batches of the runs, grouped by signature, at most `max_rows` rows each."""
        for rank in range(max(map(len, per_run), default=0)):
            by_signature: dict[tuple, list[MicroBatch]] = {}
            for batches in per_run:
                if rank < len(batches) and batches[rank].rows > 0:
                    by_signature.setdefault(batches[rank].signature(), []).append(batches[rank])
            for group in by_signature.values():
                current: list[MicroBatch] = []
                for batch in group:
                    if current and self.max_rows is not None and sum(b.rows for b in current) + batch.rows > self.max_rows:
                        yield current
                        current = []
                    current.append(batch)
                yield current

    def _forward(self, group: list[MicroBatch], backward: bool) -> list[tuple[float, float]]:
        """One forward pass over the group's rows (then, with `backward`, backward of the sum of their loss sums;
        without, no graph is built); (loss sum, units) each."""
        device = next(self.model.parameters()).device  # the rows may live elsewhere (CPU rows, CUDA model)
        first = group[0].inputs
        if isinstance(first, torch.Tensor):
            inputs: ModelInputs = torch.cat([b.inputs for b in group]).to(device)
        else:
            inputs = {k: torch.cat([b.inputs[k] for b in group]).to(device) for k in first}
        rows = [b.run.adapter for b in group for _ in range(b.rows)]
        routing = routed(self.model, rows) if self.route else nullcontext()
        saved = torch.autograd.graph.save_on_cpu(pin_memory=True) if backward and self.offload else nullcontext()
        with routing:  # backward inside: gradient checkpointing re-runs the forward
            with self.autocast(), saved, torch.set_grad_enabled(backward):
                logits = model_logits(self.model, inputs)
                total, start, sums = logits.new_zeros((), dtype=torch.float32), 0, []
                for b in group:
                    loss_sum, units = b.loss(logits[start:start + b.rows], to_device(b.targets, device))
                    start += b.rows
                    total = total + loss_sum.sum()
                    sums.append((loss_sum.detach().sum().item(), units.sum().item()))
            if backward:
                total.backward()
        return sums


class _RandomState:
    """The random generators' state now (CPU, and CUDA if present), to draw the same numbers again from it."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def to_device(targets: Any, device: torch.device) -> Any:
    """Inputs or targets on the model's device: a tensor, or a dict of them (a Task's batch)."""
    if isinstance(targets, torch.Tensor):
        return targets.to(device)
    if isinstance(targets, dict):
        return {k: to_device(v, device) for k, v in targets.items()}
    return targets
