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

from ..api import routed
from ..core.registry import get_registry
from ..core.slot import SLOT_ATTR
from .tasks import Rows, Task, num_rows

Inputs = dict[str, torch.Tensor] | torch.Tensor
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


def _to(targets: Any, device: torch.device) -> Any:
    """Targets on the model's device: a tensor, or a dict of them (a Task's batch)."""
    if isinstance(targets, torch.Tensor):
        return targets.to(device)
    if isinstance(targets, dict):
        return {k: _to(v, device) for k, v in targets.items()}
    return targets


def _length(data: Data) -> int:
    return num_rows(data) if isinstance(data, dict) else len(data)


@dataclass
class Job:
    """One adapter's training run: its rows, how to batch and score them, and its optimizer.

    `collate(data, idx)` returns `(inputs, targets)` for rows `idx`; inputs are a dict of tensors
    (passed as keyword arguments) or one tensor, batch dimension first. `loss(outputs, targets)` gets
    this job's rows of the model's output (`.logits` when the output has it) and returns per-row
    losses `[B]` (the job's loss is their mean) or `(loss_sum [B], units [B])` (the job's loss is
    Σ loss_sum / Σ units over the batch, e.g. tokens of a language-model loss).
    Data order: a `torch.Generator` seeded with `seed` draws one permutation per epoch, as in
    `peftkit.train.trainer`.
    """

    adapter: str
    data: Data
    loss: RowLoss
    collate: Collate = collate_rows
    batch_size: int = 16
    epochs: int = 1
    lr: float = 1e-3
    seed: int = 0
    optimizer: OptimizerFactory | None = None  # default: AdamW(lr=self.lr)
    schedule: ScheduleFactory | None = None  # (optimizer, total_steps) -> scheduler, stepped once per step

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


class _Replay:
    """Stands in for the model in a Task's `row_stats`: returns this job's rows of the shared forward pass."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, *args: Any, **kwargs: Any) -> "_Replay":
        return self


def task_job(task: Task, rows: Rows, adapter: str, **fields: Any) -> Job:
    """A job scored exactly as `peftkit.train`'s Task scores it (its `row_stats`: loss sums and units per row).

    Text rows stay padded to the data's max_length instead of being cut per batch (as `Task.collate`
    does for one job), so jobs' batches have one shape and share forward passes; the attention
    mask makes the padding inert. Tasks with their own collate (image resizing) keep it.
    """
    own_collate = type(task).collate is not Task.collate

    def collate(data: Rows, idx: torch.Tensor) -> tuple[Inputs, Rows]:
        batch = task.collate(data, idx) if own_collate else {k: v[idx] for k, v in data.items()}
        return {k: v for k, v in batch.items() if k != "labels"}, batch

    def loss(logits: torch.Tensor, batch: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        stats = task.row_stats(_Replay(logits), batch)
        return stats.loss_sum, stats.units

    return Job(adapter, rows, loss, collate, **fields)


@dataclass
class JobState:
    """A running job: its parameters, optimizer, schedule, position in the data and losses so far."""

    job: Job
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    batches: Iterator[torch.Tensor]
    losses: list[float] = field(default_factory=list)
    done: bool = False

    @property
    def steps(self) -> int:
        return len(self.losses)


class Sync(Protocol):
    """What data-parallel training adds to a step (`peftkit.train.distributed.AdapterGradSync`)."""

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over all processes."""

    def grads(self, params: list[nn.Parameter]) -> None:
        """Sum the gradients of `params` over all processes, in place (a missing gradient counts as zero)."""


@dataclass
class _Batch:
    """One job's rows for this step (only this process's shard of them when data-parallel)."""

    state: JobState
    inputs: Inputs | None
    targets: Any
    rows: int

    def signature(self) -> tuple:
        """Batches with equal signatures can share one forward pass (same keys, trailing shapes, dtypes)."""
        if isinstance(self.inputs, torch.Tensor):
            return (tuple(self.inputs.shape[1:]), self.inputs.dtype)
        return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(self.inputs.items()))


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
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
        if world > 1 and sync is None:
            raise ValueError("a shard of a multi-process run needs a `sync` to combine the processes' gradients")
        self.model, self.max_rows, self.shard = model, max_rows, shard
        self.sync, self.on_finish = sync, on_finish
        self.jobs: dict[str, JobState] = {}  # every job ever added, finished ones included
        self.seconds = 0.0
        self.rows_trained = 0  # rows this process has run forward and backward

    @property
    def active(self) -> list[JobState]:
        return [s for s in self.jobs.values() if not s.done]

    def add(self, job: Job) -> JobState:
        """Start a job; it takes part from the next step on. Its adapter must be attached already."""
        registry = get_registry(self.model)
        if job.adapter not in registry.configs:
            raise JobError(f"job adapter {job.adapter!r} is not attached (attached: {', '.join(registry.configs) or 'none'})")
        if job.adapter in self.jobs and not self.jobs[job.adapter].done:
            raise JobError(f"adapter {job.adapter!r} already has a running job; one job per adapter")
        shared = [n for n, p in self.model.named_parameters() if p.requires_grad and f".{SLOT_ATTR}." not in f".{n}"]
        if shared:
            raise JobError(f"trainable parameters outside any adapter would mix the jobs' gradients: {shared[:5]}; "
                           "freeze them or make them part of an adapter (modules_to_save)")
        params = [p for p in self._deltas(job.adapter).parameters() if p.requires_grad]
        if not params:
            raise JobError(f"adapter {job.adapter!r} has no trainable parameters")
        optimizer = job.optimizer(params) if job.optimizer is not None else torch.optim.AdamW(params, lr=job.lr)
        scheduler = job.schedule(optimizer, job.total_steps) if job.schedule is not None else None
        state = JobState(job, params, optimizer, scheduler, job.batch_indices())
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
        batches = [self._next_batch(s) for s in self.active]
        self._set_modes(batches)
        stats = torch.zeros(len(batches), 2, dtype=torch.float64)  # per job: loss sum, units
        for group in self._passes([b for b in batches if b.rows > 0]):
            self._forward_backward(group, stats, batches)
        if self.sync is not None:
            stats = self.sync.sum(stats)
        for (loss_sum, units), batch in zip(stats.tolist(), batches):
            if units <= 0:
                raise JobError(f"job {batch.state.job.adapter!r}: its batch at step {batch.state.steps} has no loss "
                               "units (e.g. every label masked); its mean loss is undefined")
            for p in batch.state.params:  # the backward pass summed the rows' losses: make it the mean
                if p.grad is not None:
                    p.grad.div_(units)
            batch.state.losses.append(loss_sum / units)
        if self.sync is not None:
            self.sync.grads([p for b in batches for p in b.state.params])
        for batch in batches:
            state = batch.state
            state.optimizer.step()
            if state.scheduler is not None:
                state.scheduler.step()
            state.optimizer.zero_grad(set_to_none=True)
            if state.steps == state.job.total_steps:
                self._close(state)
        self.seconds += time.perf_counter() - start
        self.rows_trained += sum(b.rows for b in batches)
        return {b.state.job.adapter: b.state.losses[-1] for b in batches}

    # ------------------------------------------------------------------ internals

    def _deltas(self, adapter: str) -> nn.ModuleList:
        registry = get_registry(self.model)
        return nn.ModuleList(getattr(self.model.get_submodule(h), SLOT_ATTR)[adapter] for h in registry.hosts[adapter])

    def _next_batch(self, state: JobState) -> _Batch:
        rank, world = self.shard
        local = next(state.batches).tensor_split(world)[rank]
        inputs, targets = state.job.collate(state.job.data, local) if local.numel() else (None, None)
        return _Batch(state, inputs, targets, local.numel())

    def _set_modes(self, batches: list[_Batch]) -> None:
        """Backbone in eval mode, the stepping jobs' deltas in train mode; refuse anything that couples rows."""
        self.model.eval()
        for batch in batches:
            batch.state.optimizer.zero_grad(set_to_none=True)
            self._deltas(batch.state.job.adapter).train()
        for name, module in self.model.named_modules():
            couples = isinstance(module, nn.modules.batchnorm._BatchNorm) or (
                isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0)
            if module.training and couples:
                raise RowCouplingError(
                    f"module {name!r} ({type(module).__name__}) is in train mode and mixes rows, so concurrent jobs "
                    "would change each other's results: give the adapter dropout=0 (and no BatchNorm in train mode)")

    def _passes(self, batches: list[_Batch]) -> Iterator[list[_Batch]]:
        """Group the batches into forward passes: same input signature, at most `max_rows` rows each."""
        by_signature: dict[tuple, list[_Batch]] = {}
        for batch in batches:
            by_signature.setdefault(batch.signature(), []).append(batch)
        for group in by_signature.values():
            current: list[_Batch] = []
            for batch in group:
                if current and self.max_rows is not None and sum(b.rows for b in current) + batch.rows > self.max_rows:
                    yield current
                    current = []
                current.append(batch)
            yield current

    def _forward_backward(self, group: list[_Batch], stats: torch.Tensor, batches: list[_Batch]) -> None:
        """One forward pass over the group's rows; backward of the sum of the jobs' loss sums."""
        device = next(self.model.parameters()).device  # the data may live elsewhere (CPU rows, CUDA model)
        if isinstance(group[0].inputs, torch.Tensor):
            inputs = torch.cat([b.inputs for b in group]).to(device)
        else:
            inputs = {k: torch.cat([b.inputs[k] for b in group]).to(device) for k in group[0].inputs}
        row_adapters = [b.state.job.adapter for b in group for _ in range(b.rows)]
        with routed(self.model, row_adapters):  # backward inside: gradient checkpointing re-runs the forward
            out = self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)
            out = getattr(out, "logits", out)
            total, start = out.new_zeros(()), 0
            for b in group:
                loss = b.state.job.loss(out[start:start + b.rows], _to(b.targets, device))
                loss_sum, units = loss if isinstance(loss, tuple) else (loss, None)
                start += b.rows
                total = total + loss_sum.sum()
                stats[batches.index(b)] += torch.tensor([loss_sum.detach().sum().item(),
                                                         b.rows if units is None else units.sum().item()])
            total.backward()

    def _close(self, state: JobState) -> None:
        state.done = True
        state.batches = iter(())
        state.optimizer.state.clear()  # free the optimizer's moments: the job is over
        if self.on_finish is not None:
            self.on_finish(state)
