"""The training loop behind `peftkit train CONFIG.yaml`.

Gradient accumulation (the loss of a step is normalised over the whole accumulation group, so it
equals one large batch), bf16 autocast, evaluation each epoch, a JSONL metrics file and a loss plot,
atomic checkpoints (adapter + optimizer + scheduler + RNG + data position), resume to the same
result as an uninterrupted run, best-checkpoint selection and early stopping.

Under torchrun (`torchrun --nproc_per_node N -m peftkit train CONFIG.yaml`) it trains data-parallel:
every process takes its contiguous share of each micro-batch, the loss is normalised by the global
unit count, and the adapter gradients are summed across processes (`train.distributed`), so the
result equals one process on the same batches. Evaluation is sharded and summed alike; rank 0 alone
writes metrics, plots, checkpoints and the adapter (into one shared output directory).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..api import attach
from ..core.io import adapter_files, write_dir_atomically
from ..core.registry import get_registry
from ..core.slot import SLOT_ATTR
from ..core.training import TrainingContext, TrainingStep
from .config import TrainConfig, TrainConfigError, config_from_mapping, load_config
from .distributed import AdapterGradSync, DistContext, broadcast_adapters, init_distributed, save_from_main
from .tasks import TASKS, Rows, Task, TaskData, num_rows

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "training.safetensors"
# Keys that may differ between a checkpoint's config and the resuming one (they do not change the numbers).
_RESUMABLE_CHANGES = ("progress", "output.dir", "output.plot", "device")


class Callback(TrainingStep):
    """Hooks into the loop; override what you need (on_train_begin, on_step_end, extra_loss, on_evaluate).

    A method's own steps (`AdapterConfig.training_steps`) are callbacks of the same kind and run first."""


@dataclass
class TrainResult:
    before: dict[str, float] | None  # eval metrics before training
    after: dict[str, float] | None  # eval metrics of the final model (the best epoch's with restore_best)
    best: dict[str, Any] | None  # {"metric", "value", "step", "epoch"}
    steps: int
    epochs: int  # complete epochs
    stopped_early: bool
    train_seconds: float
    output_dir: Path
    adapter_dir: Path | None  # None: output.save is false
    labels: list[str] | None  # class names (classification)
    model: nn.Module = field(repr=False)
    processor: Any = field(default=None, repr=False)


def _resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("device: cuda was asked for but torch sees no CUDA device")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def _resolve_bf16(precision: str, device: torch.device) -> bool:
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and device.type == "cuda" and not cuda_bf16:
        raise TrainConfigError("precision: bf16 is not supported by this GPU; use fp32")
    return precision == "bf16" or (precision == "auto" and cuda_bf16)  # CPU bf16 only when asked: often slower


def _train_device(config: TrainConfig, ctx: DistContext | None) -> torch.device:
    """The device the run trains on: this process's GPU under torchrun, else `config.device` resolved."""
    return ctx.device if ctx is not None and ctx.world_size > 1 else _resolve_device(config.device)


def planned_steps(config: TrainConfig, train_rows: int) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps of the whole run) for `train_rows` training rows."""
    schedule = config.schedule
    per_epoch = math.ceil(math.ceil(train_rows / schedule.batch_size) / schedule.grad_accum)
    return per_epoch, min(schedule.epochs * per_epoch, schedule.max_steps or math.inf)


def _lr_factor(scheduler: str, warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        if scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def _make_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    opt = config.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return cls(params, lr=opt.lr, weight_decay=opt.weight_decay)


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of a state dict, its tensors moved into `tensors` (saved as safetensors, never pickled)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):  # keys keep their type (optimizer state is keyed by int)
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict):
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _flat_keys(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "method":
            flat.update(_flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter parameter and buffer, by state-dict key: what a checkpoint restores exactly."""
    return {k: v for k, v in model.state_dict().items() if f".{SLOT_ATTR}." in f".{k}"}


class Trainer:
    """Trains the adapters attached to `model` on `data` as `config` says; see `fit`."""

    def __init__(self, model: nn.Module, task: Task, data: TaskData, config: TrainConfig,
                 callbacks: Sequence[Callback] = (), processor: Any = None, ctx: DistContext | None = None):
        self.model, self.task, self.data, self.config = model, task, data, config
        self.callbacks, self.processor = list(callbacks), processor
        self.ctx = ctx or DistContext()
        parallel = self.ctx.world_size > 1
        if parallel and config.schedule.batch_size < self.ctx.world_size:
            raise TrainConfigError(f"schedule.batch_size {config.schedule.batch_size} is smaller than the "
                                   f"{self.ctx.world_size} processes that share each batch")
        self.device = _train_device(config, self.ctx)
        self.bf16 = _resolve_bf16(config.precision, self.device)
        self.metric = config.eval.metric or task.metric
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise TrainConfigError("the model has no trainable parameters: attach an adapter first")
        self.model.to(self.device)
        self.sync = AdapterGradSync(model, [config.adapter_name]) if parallel else None
        if parallel:
            broadcast_adapters(model, [config.adapter_name])  # every process starts from rank 0's initialisation
        self.optimizer = _make_optimizer(config, params)
        schedule = config.schedule
        self.steps_per_epoch, self.total_steps = planned_steps(config, num_rows(data.train))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(schedule.scheduler, schedule.warmup_steps, self.total_steps))
        self.output = Path(config.output.dir)
        # Progress: optimizer steps taken, complete epochs, optimizer steps into the current epoch.
        self.step = self.epoch = self.step_in_epoch = 0
        self.before: dict[str, float] | None = None
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step", "epoch", "metrics"}
        self.last_eval: dict[str, Any] | None = None  # {"step", "metrics"}: saves evaluating the same weights twice
        self.bad_epochs = 0
        self.stopped_early = False
        self.train_seconds = 0.0  # in optimizer steps (evaluation and checkpoints excluded)
        self.metric_lines = 0  # lines of metrics.jsonl that belong to the state above

    # --- evaluation ------------------------------------------------------------------------------

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def _batch(self, rows: Rows, idx: torch.Tensor) -> Rows:
        return {k: v.to(self.device) for k, v in self.task.collate(rows, idx).items()}

    def _shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of the rows `idx` (all of them in a single process)."""
        return idx.tensor_split(self.ctx.world_size)[self.ctx.rank] if self.sync is not None else idx

    def _global_sum(self, values: list[float]) -> list[float]:
        """Sums over all processes (the values themselves in a single process)."""
        if self.sync is None:
            return values
        return self.sync.sum(torch.tensor(values, dtype=torch.float64)).tolist()

    @torch.inference_mode()
    def evaluate(self) -> dict[str, float] | None:
        """Loss (per unit: row or answer token) and accuracy (classification) on the eval rows."""
        rows = self.data.eval
        if rows is None:
            return None
        was_training = self.model.training
        self.model.eval()
        loss = units = correct = 0.0
        n = num_rows(rows)
        for idx in map(self._shard, torch.arange(n).split(self.config.eval.batch_size)):
            if not len(idx):
                continue
            with self._autocast():
                stats = self.task.row_stats(self.model, self._batch(rows, idx))
            loss += stats.loss_sum.sum().item()
            units += stats.units.sum().item()
            if stats.correct is not None:
                correct += stats.correct.sum().item()
        self.model.train(was_training)
        loss, units, correct = self._global_sum([loss, units, correct])
        metrics = {"loss": loss / max(units, 1.0)}
        if self.task.metric == "accuracy":
            metrics["accuracy"] = correct / n
        return metrics

    def set_param_groups(self, groups: list[dict[str, Any]]) -> None:
        """Train in these optimizer groups, each at its own lr (LoRA+: `loraplus_param_groups`), on the run's
        schedule; before the first step (a callback's `on_train_begin`). They must hold every trainable parameter."""
        if self.step:
            raise TrainConfigError(f"parameter groups must be set before training; {self.step} steps were taken")
        grouped = [p for group in groups for p in group["params"]]
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if len(grouped) != len({id(p) for p in grouped}) or {id(p) for p in grouped} != {id(p) for p in trainable}:
            raise TrainConfigError("the parameter groups must hold each trainable parameter of the model exactly once")
        schedule = self.config.schedule
        self.optimizer = _make_optimizer(self.config, groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(schedule.scheduler, schedule.warmup_steps, self.total_steps))

    # --- the loop --------------------------------------------------------------------------------

    def _train_mode(self) -> None:
        """Train mode, except frozen normalisation layers keep their running statistics (they belong to
        the base: updating them would change the base and make saved adapters and resumes inexact)."""
        self.model.train()
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()

    def _optimizer_step(self, group: list[torch.Tensor]) -> float:
        """One optimizer step over micro-batches `group`; returns the step's mean loss per unit."""
        batches = [self._batch(self.data.train, idx) for idx in map(self._shard, group) if len(idx)]
        # accumulation (and data parallelism) == one large batch: normalise by the whole group's units
        [total_units] = self._global_sum([sum(self.task.units(batch) for batch in batches)])
        loss_value = 0.0
        for batch in batches:
            with self._autocast():
                stats = self.task.row_stats(self.model, batch)
            loss = stats.loss_sum.sum() / total_units
            loss.backward()
            loss_value += loss.item()
        [loss_value] = self._global_sum([loss_value])
        for callback in self.callbacks:
            extra = callback.extra_loss(self)
            if extra is not None and self.ctx.is_main:  # once: the gradients are summed over processes next
                extra.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.sync is not None:
            self.sync.grads(params)
        if self.config.optimizer.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, self.config.optimizer.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        self.step_in_epoch += 1
        for callback in self.callbacks:
            callback.on_step_end(self)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value

    def _epoch_groups(self, order: torch.Tensor) -> list[list[torch.Tensor]]:
        batches = list(order.split(self.config.schedule.batch_size))
        accum = self.config.schedule.grad_accum
        return [batches[i:i + accum] for i in range(0, len(batches), accum)]

    def fit(self, resume: bool = False) -> TrainResult:
        """Train; with `resume`, continue from `output.dir/checkpoints/last` to the same result as one run."""
        config = self.config
        if resume and not config.output.save:
            raise TrainConfigError("cannot resume a run with output.save false: it keeps no checkpoints")
        if resume:
            self._restore(self.output / "checkpoints" / "last")
        else:
            self._start_fresh()
        for callback in self.callbacks:
            callback.on_train_begin(self)
        self._train_mode()
        generator = torch.Generator().manual_seed(config.seed)
        with tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                  disable=not config.progress or not self.ctx.is_main) as bar:
            for epoch in range(config.schedule.epochs):
                order = torch.randperm(num_rows(self.data.train), generator=generator)  # drawn every epoch: resumes see the same orders
                if epoch < self.epoch or self.step >= self.total_steps or self.stopped_early:
                    continue
                for group in self._epoch_groups(order)[self.step_in_epoch:]:
                    lr, tick = self.scheduler.get_last_lr()[0], time.perf_counter()
                    loss = self._optimizer_step(group)
                    seconds = time.perf_counter() - tick
                    self.train_seconds += seconds
                    speed = sum(len(idx) for idx in group) / seconds
                    self._log({"kind": "train", "step": self.step, "epoch": epoch, "loss": loss,
                               "lr": lr, "samples_per_s": speed})
                    bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{speed:.1f}")
                    bar.update()
                    if self.step >= self.total_steps:
                        break
                    if config.output.save_every_steps and self.step % config.output.save_every_steps == 0:
                        self._checkpoint("last")
                if self.step_in_epoch == self.steps_per_epoch:
                    self.epoch, self.step_in_epoch = epoch + 1, 0
                self._end_of_epoch()
        self.model.eval()
        return self._finish()

    def _end_of_epoch(self) -> None:
        """Evaluate, keep the best checkpoint, checkpoint, and decide on early stopping."""
        metrics = self.evaluate()
        if metrics is not None:
            self.last_eval = {"step": self.step, "metrics": metrics}
            self._log({"kind": "eval", "step": self.step, "epoch": self.epoch, **metrics})
            for callback in self.callbacks:
                callback.on_evaluate(self, metrics)
            value = metrics[self.metric]
            better = self.best is None or (value > self.best["value"] if self.metric == "accuracy"
                                           else value < self.best["value"])
            if better:
                self.best = {"metric": self.metric, "value": value, "step": self.step, "epoch": self.epoch,
                             "metrics": metrics}
                self.bad_epochs = 0
                self._checkpoint("best")
            else:
                self.bad_epochs += 1
                patience = self.config.eval.patience
                self.stopped_early = patience is not None and self.bad_epochs >= patience
        self._checkpoint("last")
        self._plot()

    def _finish(self) -> TrainResult:
        if self.config.eval.restore_best and self.best is not None and self.best["step"] != self.step:
            self._load_adapter_state(self.output / "checkpoints" / "best")
            after = self.best["metrics"]
        elif self.last_eval is not None and self.last_eval["step"] == self.step:
            after = self.last_eval["metrics"]
        else:
            after = self.evaluate()
        adapter_dir = self.output / "adapter" if self.config.output.save else None
        if adapter_dir is not None:
            save_from_main(self.model, adapter_dir, self.config.adapter_name, self.ctx)
        return TrainResult(self.before, after, self.best, self.step, self.epoch, self.stopped_early, self.train_seconds,
                           self.output, adapter_dir, self.data.labels, self.model, self.processor)

    # --- files -----------------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return self.output / "metrics.jsonl"

    def _log(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self.metric_lines += 1

    def _start_fresh(self) -> None:
        """A new run in `output.dir`: earlier metrics and checkpoints there are replaced."""
        if self.ctx.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.output / "checkpoints", ignore_errors=True)
            self.metrics_path.unlink(missing_ok=True)
            self._atomic_write(self.output / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        self.ctx.barrier()
        if self.config.eval.before:
            self.before = self.evaluate()
            if self.before is not None:
                self._log({"kind": "eval", "step": 0, "epoch": 0, **self.before})

    @staticmethod
    def _atomic_write(path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)

    def _state(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        for key, value in adapter_state(self.model).items():
            tensors[f"model.{key}"] = value.detach().cpu().contiguous()
        return {
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "before": self.before,
            "best": self.best, "last_eval": self.last_eval, "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early,
            "train_seconds": self.train_seconds, "metric_lines": self.metric_lines, "config": self.config.to_dict(),
            "optimizer": _flatten(self.optimizer.state_dict(), "optimizer", tensors),
            "scheduler": _flatten(self.scheduler.state_dict(), "scheduler", tensors),
            "rng": _flatten(rng, "rng", tensors),
        }

    def _checkpoint(self, which: str) -> Path | None:
        """Write `checkpoints/<which>` whole or not at all (temporary sibling + rename); None: saving is off."""
        if not self.config.output.save:
            return None
        tensors: dict[str, torch.Tensor] = {}
        state = self._state(tensors)
        path = self.output / "checkpoints" / which
        if self.ctx.is_main:
            write_dir_atomically(path, {**adapter_files(self.model, self.config.adapter_name),
                                        STATE_FILE: state, TENSORS_FILE: tensors})
        self.ctx.barrier()  # every process may read it next (the best epoch's adapter, a resume)
        return path

    def _read_checkpoint(self, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if not (path / STATE_FILE).is_file():
            raise TrainConfigError(f"nothing to resume: {path} holds no checkpoint")
        return json.loads((path / STATE_FILE).read_text()), load_file(str(path / TENSORS_FILE))

    @torch.no_grad()
    def _load_adapter_state(self, path: Path) -> None:
        _, tensors = self._read_checkpoint(path)
        saved = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        current = adapter_state(self.model)
        if saved.keys() != current.keys():
            raise TrainConfigError(f"{path} holds adapter tensors that do not match this model's adapters")
        for key, value in current.items():
            value.copy_(saved[key])

    def _restore(self, path: Path) -> None:
        state, tensors = self._read_checkpoint(path)
        saved, now = _flat_keys(state["config"]), _flat_keys(self.config.to_dict())
        changed = [k for k in sorted(saved.keys() | now.keys())
                   if saved.get(k) != now.get(k) and k not in _RESUMABLE_CHANGES]
        if changed:
            raise TrainConfigError(f"cannot resume from {path}: the config changed since the checkpoint "
                                   f"({', '.join(changed)}); only {', '.join(_RESUMABLE_CHANGES)} may differ")
        self._load_adapter_state(path)
        self.optimizer.load_state_dict(_unflatten(state["optimizer"], tensors))
        self.scheduler.load_state_dict(_unflatten(state["scheduler"], tensors))
        rng = _unflatten(state["rng"], tensors)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        for key in ("step", "epoch", "step_in_epoch", "before", "best", "last_eval", "bad_epochs", "stopped_early", "train_seconds",
                    "metric_lines"):
            setattr(self, key, state[key])
        if self.ctx.is_main:
            lines = self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True) if self.metrics_path.exists() else []
            self._atomic_write(self.metrics_path, "".join(lines[:self.metric_lines]))  # drop records after the checkpoint
        self.ctx.barrier()

    def _plot(self) -> None:
        if not self.config.output.plot or not self.ctx.is_main:
            return
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        records = [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines()]
        fig, ax = plt.subplots(figsize=(7, 4))
        for kind, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r["loss"]) for r in records if r["kind"] == kind]
            if points:
                ax.plot(*zip(*points), style, label=f"{kind} loss", alpha=0.8 if kind == "train" else 1.0)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        tmp = self.output / ".loss.png.tmp"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, self.output / "loss.png")


def prepare(config: TrainConfig) -> tuple[nn.Module, Any, Task, TaskData]:
    """Check the data, load the model and attach the adapter: every named error happens here, before training."""
    task = TASKS[config.task]()
    if (config.eval.metric or task.metric) == "accuracy" and task.metric != "accuracy":
        raise TrainConfigError(f"eval.metric: task {task.name} has no accuracy; use loss")
    torch.manual_seed(config.seed)
    raw = task.read_data(config.data, config.seed)
    if raw.eval is None and config.eval.patience is not None:
        raise TrainConfigError("eval.patience needs eval data: set data.eval or data.eval_fraction")
    model, processor = task.load_model(config.model, raw)
    data = task.encode(raw, processor, config.data)
    method = config.method.fill_from_run(planned_steps(config, num_rows(data.train))[1])
    if config.model.train_head:
        head = [m for m in task.head_modules(config.model) if m not in method.modules_to_save]
        method = method.model_copy(update={"modules_to_save": [*method.modules_to_save, *head]})
    attach(model, method, name=config.adapter_name)
    if config.model.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise TrainConfigError(f"model.gradient_checkpointing: {config.model.name} does not support it "
                                   "(Hugging Face transformers models do)")
        # Non-reentrant: recomputation works although the frozen base's inputs do not require grad.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, processor, task, data


SELECTION_BATCHES = 4  # training batches a method's selection on data (Fisher) looks at before training


def mean_loss(task: Task) -> Callable[[nn.Module, Rows], torch.Tensor]:
    """The task's mean loss per unit of a batch: what a selection on data differentiates."""
    def loss(model: nn.Module, batch: Rows) -> torch.Tensor:
        stats = task.row_stats(model, batch)
        return stats.loss_sum.sum() / stats.units.sum()
    return loss


def training_context(model: nn.Module, adapter: str, steps: int, task: Task, rows: Rows, batch_size: int, seed: int,
                     device: torch.device | None = None) -> TrainingContext:
    """A method's view of the run: the first SELECTION_BATCHES batches of a `seed`-shuffled order of `rows`
    (moved to `device` when given) for its selection, and the task's mean loss."""
    order = torch.randperm(num_rows(rows), generator=torch.Generator().manual_seed(seed))
    batches = [task.collate(rows, idx) for idx in order.split(batch_size)[:SELECTION_BATCHES]]
    if device is not None:
        batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    return TrainingContext(model, adapter, steps, batches, mean_loss(task))


def method_steps(config: TrainConfig, model: nn.Module, task: Task, data: TaskData,
                 ctx: DistContext | None = None) -> list[TrainingStep]:
    """The attached method's own training steps (its selection on data runs now, on the training device)."""
    device = _train_device(config, ctx)
    model.to(device)
    context = training_context(model, config.adapter_name, planned_steps(config, num_rows(data.train))[1], task,
                               data.train, config.schedule.batch_size, config.seed, device)
    return get_registry(model).require(config.adapter_name).training_steps(context)


def run_training(config: TrainConfig | dict[str, Any] | str | os.PathLike, resume: bool = False,
                 callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train as `config` says (a TrainConfig, a dict, or a YAML path) and save the adapter to `output.dir/adapter`.

    The method's own training steps (`AdapterConfig.training_steps`) run before `callbacks`."""
    if isinstance(config, dict):
        config = config_from_mapping(config)
    elif not isinstance(config, TrainConfig):
        config = load_config(config)
    ctx = init_distributed() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None  # under torchrun
    try:
        model, processor, task, data = prepare(config)
        steps = method_steps(config, model, task, data, ctx)
        return Trainer(model, task, data, config, [*steps, *callbacks], processor, ctx).fit(resume=resume)
    finally:
        if ctx is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
