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
from ..core.slot import deltas_of, is_delta_parameter
from ..core.training import TrainingContext, TrainingStep
from ..models import require_extra
from .config import DataSection, TrainConfig, TrainConfigError, config_from_mapping, load_config
from .engine import Engine, MicroBatch, Run, param_groups, scale_lr, selection_indices, task_loss, to_device
from .distributed import AdapterGradSync, DistContext, broadcast_adapters, init_distributed, save_from_main
from .full import FullFinetune, full_files, load_full, save_full, train_base
from .mezo import EPS, MeZO
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
    best: dict[str, Any] | None  # {"metric", "value", "step", "epoch", "metrics"}: the best evaluation
    last: dict[str, Any] | None  # {"step", "epoch", "metrics"}: the last evaluation
    test: dict[str, float] | None  # data.test metrics of the final model, scored once after training
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


def _make_optimizer(config: TrainConfig, params: list[Any]) -> torch.optim.Optimizer:
    opt = config.optimizer
    if opt.name == "mezo":  # the run's seed draws its noise: a resumed or repeated run perturbs alike
        return MeZO(params, lr=opt.lr, eps=opt.eps or EPS, weight_decay=opt.weight_decay, seed=config.seed)
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
    return {k: v for k, v in model.state_dict().items() if is_delta_parameter(k)}


@torch.inference_mode()
def score_sums(task: Task, model: nn.Module, batch: Callable[[torch.Tensor], Rows], batches: Sequence[torch.Tensor],
               autocast: Callable[[], Any] = nullcontext, progress: bool = False, desc: str = "eval") -> list[float]:
    """[summed loss, loss units, correct predictions] over the row batches `batches` (`batch(idx)` forms one on
    the model's device), in eval mode, with a progress bar when `progress`."""
    model.eval()
    loss = units = correct = 0.0
    for idx in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress):
        with autocast():
            stats = task.row_stats(model, batch(idx))
        loss += stats.loss_sum.sum().item()
        units += stats.units.sum().item()
        if stats.correct is not None:
            correct += stats.correct.sum().item()
    return [loss, units, correct]


def split_metrics(task: Task, loss: float, units: float, correct: float, rows: int) -> dict[str, float]:
    """Loss per unit, and accuracy for classification, from `score_sums` over `rows` rows."""
    metrics = {"loss": loss / max(units, 1.0)}
    if task.metric == "accuracy":
        metrics["accuracy"] = correct / rows
    return metrics


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
        if config.model.offload_activations and self.device.type != "cuda":
            raise TrainConfigError(f"model.offload_activations moves the activations saved for backward from GPU to "
                                   f"CPU memory; this run trains on {self.device.type}, where they already are")
        self.metric = config.eval.metric or task.metric
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise TrainConfigError("the model has no trainable parameters: attach an adapter first")
        self.model.to(self.device)
        self.sync = AdapterGradSync(model, [config.adapter_name]) if parallel else None
        if parallel:
            broadcast_adapters(model, [config.adapter_name])  # every process starts from rank 0's initialisation
        self.steps_per_epoch, self.total_steps = planned_steps(config, num_rows(data.train))
        optimizer = self._new_optimizer()
        self.run = Run(model, config.adapter_name, optimizer, self._schedule(optimizer, 0), self.total_steps,
                       self.callbacks, config.optimizer.max_grad_norm, host=self)
        self.engine = Engine(model, sync=self.sync, autocast=self._autocast, is_main=self.ctx.is_main,
                             offload=config.model.offload_activations)
        self.output = Path(config.output.dir)
        # Progress: complete epochs, optimizer steps into the current epoch (`step`: optimizer steps taken).
        self.epoch = self.step_in_epoch = 0
        self.phase_start = 0  # the step at which a method last restarted the optimizer (LT-SFT's second phase)
        self.before: dict[str, float] | None = None
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step", "epoch", "metrics"}
        self.last_eval: dict[str, Any] | None = None  # {"step", "metrics"}: saves evaluating the same weights twice
        self.bad_epochs = 0
        self.stopped_early = False
        self.train_seconds = 0.0  # in optimizer steps (evaluation and checkpoints excluded)
        self.metric_lines = 0  # lines of metrics.jsonl that belong to the state above

    # The run's progress and optimizer, as the hooks (`TrainingStep`) and the checkpoints see them.
    step = property(lambda self: self.run.step, lambda self, value: setattr(self.run, "step", value))
    optimizer = property(lambda self: self.run.optimizer)
    scheduler = property(lambda self: self.run.scheduler)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        """The config's optimizer over the parameters trainable now, in the method's groups (LoRA+) if it has them."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return _make_optimizer(self.config, param_groups(self.model, self.config.adapter_name, self.config.optimizer.lr,
                                                         params))

    def _schedule(self, optimizer: torch.optim.Optimizer, start: int) -> torch.optim.lr_scheduler.LambdaLR:
        """The learning-rate schedule over steps `start`..`total_steps` (a method's new phase starts its own)."""
        schedule = self.config.schedule
        factor = _lr_factor(schedule.scheduler, schedule.warmup_steps, self.total_steps - start)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def restart_optimizer(self, lr_scale: float = 1.0) -> None:
        """A fresh optimizer over the parameters trainable now, at `lr_scale` × the run's learning rate, and a fresh
        schedule over the remaining steps: for a method that changes what it trains mid-run (LT-SFT's phase 2)."""
        optimizer = self._new_optimizer()
        scale_lr(optimizer, lr_scale)
        self.run.optimizer, self.run.scheduler = optimizer, self._schedule(optimizer, self.step)
        # the first phase's checkpoints hold an adapter of another shape: the best epoch is chosen in this phase
        self.best, self.bad_epochs = None, 0
        self.phase_start = self.step

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

    def evaluate(self) -> dict[str, float] | None:
        """Loss (per unit: row or answer token) and accuracy (classification) on the eval rows."""
        return self.score_split("eval")

    def score_split(self, split: str) -> dict[str, float] | None:
        """`evaluate`'s metrics on the rows of `split` ("eval" or "test"); None when there are none."""
        rows = getattr(self.data, split)
        if rows is None:
            return None
        was_training = self.model.training
        batches = [idx for idx in map(self._shard, torch.arange(num_rows(rows)).split(self.config.eval.batch_size))
                   if len(idx)]
        sums = score_sums(self.task, self.model, lambda idx: self._batch(rows, idx), batches, self._autocast,
                          progress=self.config.progress and self.ctx.is_main, desc=split)
        if was_training:
            self._train_mode()  # frozen BatchNorm layers stay in eval mode
        return split_metrics(self.task, *self._global_sum(sums), num_rows(rows))

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
        """One optimizer step over micro-batches `group` (accumulation and data parallelism equal one large
        batch: the engine normalises by the whole group's units); returns the step's mean loss per unit."""
        loss = task_loss(self.task)
        batches = []
        for idx in map(self._shard, group):
            batch = self._batch(self.data.train, idx) if len(idx) else None
            inputs = self.task.inputs(batch) if batch is not None else None
            batches.append(MicroBatch(self.run, inputs, batch, len(idx), loss))
        [loss_value] = self.engine.step([(self.run, batches)])
        self.step_in_epoch += 1
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
        chosen = {"step": self.step, "epoch": self.epoch}
        restore = self.config.eval.restore_best and self.best is not None and self.best["step"] != self.step
        if restore:
            self._load_adapter_state(self.output / "checkpoints" / "best")
            chosen = {"step": self.best["step"], "epoch": self.best["epoch"]}
        for callback in self.callbacks:  # a check on the run as it ended (PhaseChange: did phase 2 happen?)
            callback.on_train_end(self)
        if restore:
            after = self.best["metrics"]
        elif self.last_eval is not None and self.last_eval["step"] == self.step:
            after = self.last_eval["metrics"]
        else:
            after = self.evaluate()
        test = self.score_split("test")  # once, with the chosen weights
        if test is not None:
            self._log({"kind": "test", **chosen, **test})
        adapter_dir = self.output / "adapter" if self.config.output.save else None
        if adapter_dir is not None and isinstance(self.config.method, FullFinetune):
            if self.ctx.is_main:
                save_full(self.model, adapter_dir)
        elif adapter_dir is not None:
            save_from_main(self.model, adapter_dir, self.config.adapter_name, self.ctx)
        last = self.last_eval and {"step": self.last_eval["step"], "epoch": self.epoch,
                                   "metrics": self.last_eval["metrics"]}
        return TrainResult(before=self.before, after=after, best=self.best, last=last, test=test, steps=self.step,
                           epochs=self.epoch, stopped_early=self.stopped_early, train_seconds=self.train_seconds,
                           output_dir=self.output, adapter_dir=adapter_dir, labels=self.data.labels, model=self.model,
                           processor=self.processor)

    def _weight_files(self) -> dict[str, Any]:
        """The files of what this run trains: its adapter's, or with `method: full` the whole model's."""
        if isinstance(self.config.method, FullFinetune):
            return full_files(self.model)
        return adapter_files(self.model, self.config.adapter_name)

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
        for i, callback in enumerate(self.callbacks):  # the method's steps come first, in the same order every run
            for key, value in callback.state_dict().items():
                tensors[f"steps.{i}.{type(callback).__qualname__}.{key}"] = value.detach().cpu().contiguous()
        return {
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "before": self.before,
            "best": self.best, "last_eval": self.last_eval, "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early,
            "train_seconds": self.train_seconds, "metric_lines": self.metric_lines, "phase_start": self.phase_start,
            "config": self.config.to_dict(),
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
            write_dir_atomically(path, {**self._weight_files(), STATE_FILE: state, TENSORS_FILE: tensors})
        self.ctx.barrier()  # every process may read it next (the best epoch's adapter, a resume)
        return path

    def _read_checkpoint(self, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if not (path / STATE_FILE).is_file():
            raise TrainConfigError(f"nothing to resume: {path} holds no checkpoint")
        return json.loads((path / STATE_FILE).read_text()), load_file(str(path / TENSORS_FILE))

    @torch.no_grad()
    def _load_adapter_state(self, path: Path) -> None:
        _, tensors = self._read_checkpoint(path)
        if isinstance(self.config.method, FullFinetune):  # the whole model's weights are the checkpoint's own
            load_full(self.model, path)
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
        if state.get("phase_start"):  # absent in checkpoints written before phases existed
            raise TrainConfigError(f"cannot resume from {path}: the method restarted its optimizer at step "
                                   f"{state['phase_start']} (a second training phase, e.g. LT-SFT's), and a resume "
                                   "past that point is not supported; start the run again")
        fixed = [type(c).__name__ for c in self.callbacks if not c.resumable]
        if fixed:
            raise TrainConfigError(f"cannot resume from {path}: {', '.join(fixed)} changes the adapter in ways a "
                                   "checkpoint does not hold (Fish-Dip's re-selections); start the run again")
        self._load_adapter_state(path)
        for i, callback in enumerate(self.callbacks):
            prefix = f"steps.{i}.{type(callback).__qualname__}."
            callback.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
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


def _data_sources(data: DataSection) -> str:
    if data.name is not None:
        return f"{data.name} (bundled)" + (f", test {data.test}" if data.test is not None else "")
    return ", ".join(f"{split} {path}" for split, path in
                     (("train", data.train), ("eval", data.eval), ("test", data.test)) if path is not None)


def prepare(config: TrainConfig, say: Callable[[str], None] = lambda message: None
            ) -> tuple[nn.Module, Any, Task, TaskData]:
    """Check the data, load the model and attach the adapter (or, with `method: full`, unfreeze the whole model):
    every named error happens here, before training. `say(message)` hears each slow step before it starts."""
    task = TASKS[config.task]()
    if (config.eval.metric or task.metric) == "accuracy" and task.metric != "accuracy":
        raise TrainConfigError(f"eval.metric: task {task.name} has no accuracy; use loss")
    if config.output.plot:  # drawn after the first epoch: fail now, not after training
        require_extra("matplotlib", "train")
    torch.manual_seed(config.seed)
    say(f"reading data: {_data_sources(config.data)}")
    raw = task.read_data(config.data, config.seed)
    if raw.eval is None and config.eval.patience is not None:
        raise TrainConfigError("eval.patience needs eval data: set data.eval or data.eval_fraction")
    say(f"loading model {config.model.name} and encoding the data")
    model, processor = task.load_model(config.model, raw)
    data = task.encode(raw, processor, config.data)
    if isinstance(config.method, FullFinetune):
        train_base(model)
        _checkpoint_activations(config, model)
        return model, processor, task, data
    method = config.method.fill_from_run(planned_steps(config, num_rows(data.train))[1])
    if config.model.train_head:
        head = [m for m in task.head_modules(config.model) if m not in method.modules_to_save]
        method = method.model_copy(update={"modules_to_save": [*method.modules_to_save, *head]})
    attach(model, method, name=config.adapter_name)
    _checkpoint_activations(config, model)
    return model, processor, task, data


def _checkpoint_activations(config: TrainConfig, model: nn.Module) -> None:
    """Gradient checkpointing, when `model.gradient_checkpointing` asks for it: per block (each transformer layer's
    activations are recomputed in backward instead of kept)."""
    if config.model.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise TrainConfigError(f"model.gradient_checkpointing: {config.model.name} does not support it "
                                   "(Hugging Face transformers models do)")
        reason = getattr(config.method, "not_checkpointable", None)
        if reason:
            raise TrainConfigError(f"model.gradient_checkpointing: method {config.method.method} cannot use it: {reason}")
        prefixes = [name for name, delta in deltas_of(model).items() if getattr(delta, "kind", None) == "prefix"]
        if prefixes:  # a layer that writes to the cache would write twice when backward recomputes it
            raise TrainConfigError(f"model.gradient_checkpointing: adapter {prefixes[0]!r} passes its prefix to the "
                                   "layers in their key/value cache, which transformers' checkpointed layers drop "
                                   "(past_key_values=None): train prefix methods without checkpointing")
        # Non-reentrant: recomputation works although the frozen base's inputs do not require grad. transformers
        # before 5.23 names it gradient_checkpointing_enable.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def mean_loss(task: Task) -> Callable[[nn.Module, Rows], torch.Tensor]:
    """The task's mean loss per unit of a batch: what a selection on data differentiates."""
    def loss(model: nn.Module, batch: Rows) -> torch.Tensor:
        stats = task.row_stats(model, batch)
        return stats.loss_sum.sum() / stats.units.sum()
    return loss


def training_context(model: nn.Module, adapter: str, steps: int, task: Task, rows: Rows, batch_size: int, seed: int,
                     device: torch.device | None = None) -> TrainingContext:
    """A method's view of the run: the first batches of the first epoch (`engine.selection_indices`, moved to
    `device` when given) for its selection, and the task's mean loss."""
    batches = [task.collate(rows, idx) for idx in selection_indices(num_rows(rows), batch_size, seed)]
    if device is not None:
        batches = [to_device(batch, device) for batch in batches]
    return TrainingContext(model, adapter, steps, batches, mean_loss(task))


def method_steps(config: TrainConfig, model: nn.Module, task: Task, data: TaskData,
                 ctx: DistContext | None = None) -> list[TrainingStep]:
    """The attached method's own training steps (its selection on data runs now, on the training device)."""
    device = _train_device(config, ctx)
    model.to(device)
    if isinstance(config.method, FullFinetune):
        return []
    context = training_context(model, config.adapter_name, planned_steps(config, num_rows(data.train))[1], task,
                               data.train, config.schedule.batch_size, config.seed, device)
    return get_registry(model).require(config.adapter_name).training_steps(context)


def run_training(config: TrainConfig | dict[str, Any] | str | os.PathLike, resume: bool = False,
                 callbacks: Sequence[Callback] = (), say: Callable[[str], None] = lambda message: None) -> TrainResult:
    """Train as `config` says (a TrainConfig, a dict, or a YAML path) and save the adapter to `output.dir/adapter`.

    The method's own training steps (`AdapterConfig.training_steps`) run before `callbacks`; `say(message)`
    hears what is being loaded, before each slow step."""
    if isinstance(config, dict):
        config = config_from_mapping(config)
    elif not isinstance(config, TrainConfig):
        config = load_config(config)
    ctx = init_distributed() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None  # under torchrun
    try:
        if ctx is not None and isinstance(config.method, FullFinetune):
            raise TrainConfigError("method: full does not train under torchrun: only adapter gradients are "
                                   "synchronised across processes")
        if ctx is not None and config.method.trains_base:  # each process would restart from its own random init
            raise TrainConfigError(f"method {config.method.method} writes into the base weights while it trains, "
                                   "which processes do not synchronise: train it in one process")
        model, processor, task, data = prepare(config, say)
        steps = method_steps(config, model, task, data, ctx)
        return Trainer(model, task, data, config, [*steps, *callbacks], processor, ctx).fit(resume=resume)
    finally:
        if ctx is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
