"""Concurrent multi-adapter training (mLoRA-style): K jobs, one frozen backbone, shared forward passes.

Each job trains its own adapter on its own data with its own optimizer, schedule and seed. A
step takes every active job's next batch, packs the batches into as few forward passes as the
row budget allows, routes each row to its job's adapter (`peftkit.routed`) and backpropagates
the sum of the jobs' loss sums; each adapter's gradient is then divided by its own job's unit
count (rows, or tokens for token-level losses). Routing sends a job's gradient only to its own
adapter, so every job gets exactly the gradient of its own mean loss, as if trained alone.
Jobs can be added and finished while others continue. `task_job` builds a job from a
`peftkit.train` Task (its data rows and its per-row loss), so jobs score as `peftkit train` does.

Rows must not interact, or the equality with separate runs breaks: the backbone runs in eval
mode (no dropout; BatchNorm uses its running statistics), the adapters in train mode, and any
module still in train mode that couples rows (dropout with p > 0, BatchNorm) is refused with
`RowCouplingError`. Trainable parameters outside the jobs' adapters would mix jobs' gradients
and are refused too.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import default_collate

from ..api import adapter_parameters
from ..core.registry import adapter_deltas, get_registry
from ..core.slot import is_delta_parameter
from ..core.training import TrainingContext
from .engine import BatchLoss, Engine, MicroBatch, Run, param_groups, scale_lr, selection_indices, task_loss, to_device
from .mezo import MeZO, check_zeroth_order
from .tasks import ModelInputs as Inputs
from .tasks import Rows, Task, model_logits, num_rows

Data = Sequence[Any] | Rows
Collate = Callable[[Data, torch.Tensor], tuple[Inputs, Any]]
RowLoss = Callable[[torch.Tensor, Any], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
ScheduleFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


class JobError(ValueError):
    """A job that cannot be trained concurrently (unknown or duplicate adapter, nothing to train, ...)."""


class RowCouplingError(ValueError):
    """A module in train mode that mixes rows (dropout, BatchNorm), so jobs would change each other's results."""


def collate_rows(data: Data, idx: torch.Tensor) -> tuple[Inputs, Any]:
    """Default collate: a dict of tensors gives `{k: v[idx]}` with "labels" split off as the targets;
    a sequence of `(inputs, target)` rows is stacked with torch's `default_collate`."""
    if isinstance(data, dict):
        if "labels" not in data:
            raise JobError(f"a job's tensor data needs a 'labels' entry for the targets (has {sorted(data)}); "
                           "or give the job its own collate")
        return {k: v[idx] for k, v in data.items() if k != "labels"}, data["labels"][idx]
    return default_collate([data[i] for i in idx.tolist()])


def _length(data: Data) -> int:
    return num_rows(data) if isinstance(data, dict) else len(data)


def _batch_loss(loss: RowLoss) -> BatchLoss:
    """A job's loss as the engine's (loss sum, units) per row: per-row losses count one unit per row."""
    def batch_loss(logits: torch.Tensor, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = loss(logits, targets)
        return out if isinstance(out, tuple) else (out, torch.ones_like(out))
    return batch_loss


@dataclass
class Job:
    """One adapter's training run: its rows, how to batch and score them, and its optimizer.

    `collate(data, idx)` returns `(inputs, targets)` for rows `idx`; inputs are a dict of tensors
    (passed as keyword arguments) or one tensor, batch dimension first. `loss(outputs, targets)` gets
    this job's rows of the model's output (`.logits` when the output has it) and returns per-row
    losses `[B]` (the job's loss is their mean) or `(loss_sum [B], units [B])` (the job's loss is
    Σ loss_sum / Σ units over the batch, e.g. tokens of a language-model loss). `select_collate`
    batches rows the same way for a method's selection on data (default: `collate`).
    Data order: a `torch.Generator` seeded with `seed` draws one permutation per epoch, as in
    `peftkit.train.trainer`; the first batches of the first one are what a selection on data sees.
    """

    adapter: str
    data: Data
    loss: RowLoss
    collate: Collate = collate_rows
    batch_size: int = 16
    epochs: int = 1
    lr: float = 1e-3
    seed: int = 0
    # params or parameter groups -> optimizer; default: AdamW(lr=self.lr, weight_decay=0), as `peftkit train`'s. A
    # method's groups (LoRA+) carry their own lr, from `lr`. A `train.mezo.MeZO` trains the job with forwards only.
    optimizer: OptimizerFactory | None = None
    schedule: ScheduleFactory | None = None  # (optimizer, total_steps) -> scheduler, stepped once per step
    max_grad_norm: float | None = None
    select_collate: Collate | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise JobError(f"job {self.adapter!r}: {name} must be >= 1, got {getattr(self, name)}")
        if _length(self.data) == 0:
            raise JobError(f"job {self.adapter!r} has no data rows")

    @property
    def total_steps(self) -> int:
        return self.epochs * math.ceil(_length(self.data) / self.batch_size)

    def batch_indices(self) -> Iterator[torch.Tensor]:
        """Row indices of every batch, epoch after epoch, in the seed's order."""
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epochs):
            yield from torch.randperm(_length(self.data), generator=generator).split(self.batch_size)

    def training_context(self, model: nn.Module) -> TrainingContext:
        """What the adapter's method sees of this job (`AdapterConfig.training_steps`): its first batches, its mean loss."""
        collate, loss = self.select_collate or self.collate, _batch_loss(self.loss)
        batches = [collate(self.data, idx) for idx in selection_indices(_length(self.data), self.batch_size, self.seed)]

        def mean_loss(model: nn.Module, batch: tuple[Inputs, Any]) -> torch.Tensor:
            device = next(model.parameters()).device
            inputs, targets = batch
            loss_sum, units = loss(model_logits(model, to_device(inputs, device)), to_device(targets, device))
            return loss_sum.sum() / units.sum()

        return TrainingContext(model, self.adapter, self.total_steps, batches, mean_loss)


def task_job(task: Task, rows: Rows, adapter: str, **fields: Any) -> Job:
    """A job scored exactly as `peftkit.train`'s Task scores it (its `loss_stats`: loss sums and units per row).

    Text rows stay padded to the data's max_length instead of being cut per batch (as `Task.collate`
    does for one job), so jobs' batches have one shape and share forward passes; the attention
    mask makes the padding inert. Tasks with their own collate (image resizing) keep it. A method's
    selection on data sees the batches `peftkit train` would give it.
    """
    own_collate = type(task).collate is not Task.collate

    def collate(data: Rows, idx: torch.Tensor) -> tuple[Inputs, Rows]:
        batch = task.collate(data, idx) if own_collate else {k: v[idx] for k, v in data.items()}
        return task.inputs(batch), batch

    def select_collate(data: Rows, idx: torch.Tensor) -> tuple[Inputs, Rows]:
        batch = task.collate(data, idx)
        return task.inputs(batch), batch

    return Job(adapter, rows, task_loss(task), collate, select_collate=select_collate, **fields)


@dataclass(eq=False)
class JobState(Run):
    """A running job: the engine's run (optimizer, schedule, steps taken, the method's hooks), the job, its
    position in the data and its losses so far. The method's hooks get it as their `trainer`."""

    job: Job | None = None
    batches: Iterator[torch.Tensor] = iter(())
    losses: list[float] = field(default_factory=list)
    done: bool = False

    def restart_optimizer(self, lr_scale: float = 1.0) -> None:
        """A fresh optimizer over the parameters trainable now, at `lr_scale` × the job's learning rate, and a fresh
        schedule over the steps left."""
        self.optimizer, self.scheduler = _optimizer(self.model, self.job, self.total_steps - self.step, lr_scale)


def _optimizer(model: nn.Module, job: Job, steps: int, lr_scale: float = 1.0) -> tuple[torch.optim.Optimizer, Any]:
    """The job's optimizer over its adapter's trainable parameters (the method's groups, if it has them), and its
    schedule over `steps`."""
    params = [p for p in dict.fromkeys(adapter_parameters(model, job.adapter)) if p.requires_grad]  # shared once
    if not params:
        raise JobError(f"adapter {job.adapter!r} has no trainable parameters")
    groups = param_groups(model, job.adapter, job.lr, params)
    optimizer = job.optimizer(groups) if job.optimizer is not None else torch.optim.AdamW(groups, lr=job.lr,
                                                                                           weight_decay=0.0)
    scale_lr(optimizer, lr_scale)
    return optimizer, job.schedule(optimizer, steps) if job.schedule is not None else None


class Sync(Protocol):
    """What data-parallel training adds to a step (`peftkit.train.distributed.AdapterGradSync`)."""

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over all processes."""

    def grads(self, params: list[nn.Parameter]) -> None:
        """Sum the gradients of `params` over all processes, in place (a missing gradient counts as zero)."""


class MultiJobTrainer:
    """Train several adapters at once over one frozen backbone (see the module docstring).

    `max_rows` caps the rows of one forward pass (None: every compatible batch in one pass). A
    job's batch is never split, so `max_rows` equal to the batch size runs one job per pass:
    the activation memory of one job, still one backbone for all. `shard=(rank, world_size)`
    makes this process handle only its contiguous share of every batch (data parallel), with
    `sync` summing loss statistics and gradients over the processes. `on_finish(state)` runs
    when a job has done its last step (e.g. to save its adapter).
    """

    def __init__(self, model: nn.Module, max_rows: int | None = None, shard: tuple[int, int] = (0, 1),
                 sync: Sync | None = None, on_finish: Callable[[JobState], None] | None = None):
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
        if world > 1 and sync is None:
            raise ValueError("a shard of a multi-process run needs a `sync` to combine the processes' gradients")
        self.engine = Engine(model, route=True, max_rows=max_rows, sync=sync, is_main=rank == 0)
        self.model, self.shard, self.on_finish = model, shard, on_finish
        self.jobs: dict[str, JobState] = {}  # every job ever added, finished ones included
        self.seconds = 0.0
        self.rows_trained = 0  # rows this process has run forward and backward

    @property
    def active(self) -> list[JobState]:
        return [s for s in self.jobs.values() if not s.done]

    def add(self, job: Job) -> JobState:
        """Start a job; it takes part from the next step on. Its adapter must be attached already.

        The adapter's method's own steps (`AdapterConfig.training_steps`: a selection on the job's first
        batches, per-step hooks, an extra loss) run now and inside every step, as in `peftkit train`."""
        registry = get_registry(self.model)
        if job.adapter not in registry.configs:
            raise JobError(f"job adapter {job.adapter!r} is not attached (attached: {', '.join(registry.configs) or 'none'})")
        if job.adapter in self.jobs and not self.jobs[job.adapter].done:
            raise JobError(f"adapter {job.adapter!r} already has a running job; one job per adapter")
        shared = [n for n, p in self.model.named_parameters() if p.requires_grad and not is_delta_parameter(n)]
        if shared:
            raise JobError(f"trainable parameters outside any adapter would mix the jobs' gradients: {shared[:5]}; "
                           "freeze them or make them part of an adapter (modules_to_save)")
        writers = [s.adapter for s in self.active if registry.configs[s.adapter].trains_base]
        if self.active and registry.configs[job.adapter].trains_base:
            writers.append(job.adapter)
        if writers:
            raise JobError(f"adapter {writers[0]!r} ({registry.configs[writers[0]].method}) writes into the base weights "
                           "while it trains (ReLoRA's restarts), and the other jobs share that base: train it alone")
        hooks = registry.configs[job.adapter].training_steps(job.training_context(self.model))  # may change what trains
        optimizer, scheduler = _optimizer(self.model, job, job.total_steps)
        if isinstance(optimizer, MeZO):
            check_zeroth_order(registry.configs[job.adapter], job.max_grad_norm)
        state = JobState(self.model, job.adapter, optimizer, scheduler, job.total_steps, hooks, job.max_grad_norm,
                         job=job, batches=job.batch_indices())
        for hook in hooks:
            hook.on_train_begin(state)
        self.jobs[job.adapter] = state
        return state

    def finish(self, adapter: str) -> JobState:
        """Stop a job early (its adapter keeps what it has learnt); `on_finish` runs for it."""
        state = self.jobs.get(adapter)
        if state is None or state.done:
            raise JobError(f"no running job for adapter {adapter!r}")
        self._close(state)
        return state

    def run(self) -> dict[str, JobState]:
        """Step until every job has finished; returns every job's state (losses per step)."""
        while self.active:
            self.step()
        return self.jobs

    def step(self) -> dict[str, float]:
        """One optimizer step for every active job; returns each job's loss (mean over its global batch)."""
        start = time.perf_counter()
        work = [(state, [self._next_batch(state)]) for state in self.active]
        self._set_modes([state for state, _ in work])
        losses = self.engine.step(work)
        for (state, _), loss in zip(work, losses):
            state.losses.append(loss)
            if state.step == state.total_steps:
                self._close(state)
        self.seconds += time.perf_counter() - start
        self.rows_trained += sum(batches[0].rows for _, batches in work)
        return {state.adapter: loss for (state, _), loss in zip(work, losses)}

    # ------------------------------------------------------------------ internals

    def _next_batch(self, state: JobState) -> MicroBatch:
        rank, world = self.shard
        local = next(state.batches).tensor_split(world)[rank]
        job = state.job
        inputs, targets = job.collate(job.data, local) if local.numel() else (None, None)
        return MicroBatch(state, inputs, targets, local.numel(), _batch_loss(job.loss))

    def _set_modes(self, states: list[JobState]) -> None:
        """Backbone in eval mode, the stepping jobs' deltas in train mode; refuse anything that couples rows."""
        self.model.eval()
        for state in states:
            for _, _, delta in adapter_deltas(self.model, state.adapter):
                delta.train()
        for name, module in self.model.named_modules():
            couples = isinstance(module, nn.modules.batchnorm._BatchNorm) or (
                isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0)
            if module.training and couples:
                raise RowCouplingError(
                    f"module {name!r} ({type(module).__name__}) is in train mode and mixes rows, so concurrent jobs "
                    "would change each other's results: give the adapter dropout=0 (and no BatchNorm in train mode)")

    def _close(self, state: JobState) -> None:
        state.done = True
        state.batches = iter(())
        for hook in state.hooks:
            hook.on_train_end(state)
        state.optimizer.state.clear()  # free the optimizer's moments: the job is over
        if self.on_finish is not None:
            self.on_finish(state)
