"""The training config: model, task, data, method, optimizer, schedule, evaluation, output.

Every section forbids unknown keys and names the closest valid one, so a typo in a YAML file
is an error before anything loads, never a silently ignored option.
"""
from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from ..core.config import METHODS, AdapterConfig, validation_message
from ..efficient.quantize import QuantizeConfig
from .full import FullFinetune
from .mezo import check_zeroth_order


class TrainConfigError(ValueError):
    """A training config that cannot run: unknown key, task, model or method, or a bad value."""


def _unknown_keys_message(keys: list[str], valid: list[str]) -> str:
    """Every unknown key, each with the closest valid one, then the valid keys."""
    named = []
    for key in keys:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        named.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    valid_keys = f"valid keys: {', '.join(valid)}" if valid else "it takes no other keys"
    return f"unknown key{'s' * (len(keys) > 1)} {', '.join(named)}; {valid_keys}"


class _Section(BaseModel):
    """A config section: unknown keys are errors that suggest the closest valid key."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [str(key) for key in data if key not in cls.model_fields]
            if unknown:
                raise ValueError(_unknown_keys_message(unknown, list(cls.model_fields)))
        return data


class ModelSection(_Section):
    name: str = "minilm"
    train_head: bool = True  # train a fresh task head whole (added to the method's modules_to_save)
    gradient_checkpointing: bool = False  # recompute each block's activations in backward instead of keeping them
    offload_activations: bool = False  # keep what backward needs in CPU memory until then (a model on a GPU only)
    quantize: QuantizeConfig | None = None  # the base's Linear layers stored quantized: nf4 | fp4 | int8, or a mapping

    @field_validator("quantize", mode="before")
    @classmethod
    def _short_quantize(cls, value: Any) -> Any:
        """`quantize: nf4` names the scheme, `quantize: 8` the bits; a mapping gives QuantizeConfig's fields."""
        if isinstance(value, str):
            return {"scheme": value}
        if isinstance(value, int) and not isinstance(value, bool):
            return {"bits": value}
        return value


class DataSection(_Section):
    name: str | None = None  # a bundled set: bbc-news, chatterbot, fashion-mnist
    train: Path | None = None  # a local .jsonl/.json/.csv file, a folder of <label>/*.txt, or (images) <label>/<image>
    eval: Path | None = None
    test: Path | None = None  # scored once, after training, with the chosen checkpoint
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = None  # the declared label set; rows outside it are an error
    prompt_column: str = "question"
    response_column: str = "answer"
    max_length: int = Field(128, ge=1)
    image_size: int = Field(224, ge=8)
    train_limit: int | None = Field(None, ge=1)
    eval_limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if (self.name is None) == (self.train is None):
            raise ValueError("give either data.name (a bundled set) or data.train (a local file), not both or neither")
        if self.name is not None and (self.eval is not None or self.eval_fraction):
            raise ValueError("bundled data sets bring their own eval split: drop data.eval / data.eval_fraction")
        if self.eval is not None and self.eval_fraction:
            raise ValueError("give data.eval or data.eval_fraction, not both")
        return self


class OptimizerSection(_Section):
    name: Literal["adamw", "adam", "sgd", "mezo"] = "adamw"  # mezo: zeroth-order SGD, forwards only (train.mezo)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0)  # sgd only
    max_grad_norm: float | None = Field(None, gt=0)
    eps: float | None = Field(None, gt=0)  # mezo only: the perturbation scale ε (unset: 1e-3, the paper's)


class ScheduleSection(_Section):
    epochs: int = Field(2, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimizer steps (before the epochs end)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)


class EvalSection(_Section):
    metric: Literal["accuracy", "loss"] | None = None  # best-checkpoint metric; None: the task's default
    patience: int | None = Field(None, ge=1)  # stop after this many epochs without improvement
    restore_best: bool = True  # end with (and export) the best epoch's adapter
    batch_size: int = Field(64, ge=1)
    before: bool = True  # evaluate once before training


class OutputSection(_Section):
    dir: Path = Path("runs/bbc-lora")
    save_every_steps: int | None = Field(None, ge=1)  # also checkpoint mid-epoch
    plot: bool = True
    save: bool = True  # False: no checkpoints, no saved adapter (the result is the model in memory)


class TrainConfig(_Section):
    task: str = "classify-text"
    model: ModelSection = ModelSection()
    method: AdapterConfig | FullFinetune  # an adapter method, or `method: full` (every base parameter trained)
    adapter_name: str = "default"
    data: DataSection
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    eval: EvalSection = EvalSection()
    output: OutputSection = OutputSection()
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True

    @model_validator(mode="after")
    def _saving_needed(self) -> "TrainConfig":
        if not self.output.save:
            needs = [name for name, on in (("eval.restore_best", self.eval.restore_best),
                                           ("output.save_every_steps", self.output.save_every_steps)) if on]
            if needs:
                raise ValueError(f"output.save is false, but {' and '.join(needs)} need(s) saved checkpoints")
        if getattr(self.method, "trains_base", False) and (self.output.save or self.eval.restore_best):
            raise ValueError(f"method {self.method.method} writes into the base weights while it trains, so neither a "
                             "saved adapter nor the best epoch's checkpoint holds its model: set output.save: false "
                             "and eval.restore_best: false (and save the merged model yourself)")
        return self

    @model_validator(mode="after")
    def _zeroth_order_fits(self) -> "TrainConfig":
        """MeZO's options, and what it cannot train: a method that reads gradients, clipping, and the controls of
        the memory backward needs (its forwards keep no activations)."""
        optimizer = self.optimizer
        if optimizer.name != "mezo":
            if optimizer.eps is not None:
                raise ValueError(f"optimizer.eps is MeZO's perturbation scale; optimizer {optimizer.name} takes none")
            return self
        check_zeroth_order(self.method, optimizer.max_grad_norm)
        if optimizer.momentum:
            raise ValueError("optimizer.momentum: mezo takes the paper's plain zeroth-order SGD steps; leave it 0")
        backward_only = [key for key, on in (("model.gradient_checkpointing", self.model.gradient_checkpointing),
                                             ("model.offload_activations", self.model.offload_activations)) if on]
        if backward_only:
            raise ValueError(f"{' and '.join(backward_only)} save(s) memory of the activations kept for backward, "
                             "and MeZO runs no backward: its forwards keep none. Leave it off")
        return self

    @field_validator("method", mode="before")
    @classmethod
    def _method_from_dict(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        configs = method_configs()
        method = value.get("method")
        if method not in configs:
            close = difflib.get_close_matches(str(method), configs, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown PEFT method {method!r}{hint}; known methods: {', '.join(sorted(configs))}")
        refusal = getattr(configs[method], "not_trained_by_run", None)  # the full fine-tune is no AdapterConfig
        if refusal:
            raise ValueError(f"method {method} is not trained by peftkit train: {refusal}")
        try:
            return configs[method](**{key: v for key, v in value.items() if key != "method"})
        except ValidationError as err:  # every unknown key, each with the closest field of this method
            unknown = [str(e["loc"][0]) for e in err.errors() if e["type"] == "extra_forbidden"]
            if not unknown:
                raise ValueError(f"invalid {method} config: {validation_message(err)}") from None
            fields = [key for key in configs[method].model_fields if key != "method"]
            raise ValueError(f"{method}: {_unknown_keys_message(unknown, fields)}") from None

    @field_serializer("method")
    def _method_to_dict(self, method: AdapterConfig | FullFinetune) -> dict[str, Any]:
        return method.to_dict()

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from .tasks import TASKS

        return _known_name("task", value, TASKS)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: ModelSection) -> ModelSection:
        from .tasks import MODELS

        _known_name("model", value.name, MODELS)
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _known_name(what: str, name: str, known: dict[str, Any]) -> str:
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {what} {name!r}{hint}; known: {', '.join(known)}")
    return name


def method_configs() -> dict[str, type[BaseModel]]:
    """The configs a `method:` section can name: every registered adapter method, and `full`."""
    return {**METHODS, "full": FullFinetune}


def _apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TrainConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def _switch_method(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """`--set method.method=ia3` on a LoRA config: keep the `method:` keys the new method knows, drop the others
    (LoRA's r, alpha, ...) with a warning that names them; keys set by the overrides themselves stay."""
    section, new = data.get("method"), overrides["method.method"]
    configs = method_configs()
    if not isinstance(section, dict) or section.get("method") == new or new not in configs:
        return  # nothing to switch, or an unknown method: validation names it
    known = set(configs[new].model_fields) | {"method"}
    given = {dotted.removeprefix("method.") for dotted in overrides if dotted.startswith("method.")}
    dropped = [key for key in section if key not in known and key not in given]
    if dropped:
        warnings.warn(f"method {section.get('method')} -> {new}: dropped {', '.join(dropped)} "
                      f"({new} has no such key{'s' * (len(dropped) > 1)})", stacklevel=3)
    data["method"] = {key: value for key, value in section.items() if key not in dropped}


def config_from_mapping(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Validate a plain dict (as read from YAML), after applying dotted `overrides` ("schedule.epochs": 1)."""
    if not isinstance(data, dict):
        raise TrainConfigError(f"a training config must be a mapping, not {type(data).__name__}")
    data = yaml.safe_load(yaml.safe_dump(data, sort_keys=False))  # a deep copy of plain values, in their order
    overrides = overrides or {}
    if "method.method" in overrides:
        _switch_method(data, overrides)
    for dotted, value in overrides.items():
        _apply_override(data, dotted, value)
    try:
        return TrainConfig(**data)
    except ValidationError as err:
        raise TrainConfigError(f"invalid training config: {validation_message(err)}") from None
    except ValueError as err:  # raised outside pydantic's field machinery
        raise TrainConfigError(f"invalid training config: {err}") from None


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML (or JSON) training config; `None` gives the bundled default (MiniLM + LoRA on BBC News)."""
    if path is None:
        return config_from_mapping(DEFAULT_CONFIG, overrides)
    return config_from_mapping(read_config_file(path), overrides)


def read_config_file(path: str | os.PathLike) -> Any:
    """The plain values of a YAML (or JSON) config file, not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"training config {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TrainConfigError(f"{path} is not valid YAML: {err}") from None


# `peftkit train` with no config: the README's main job. configs/bbc-lora.yaml holds the same (a test checks).
DEFAULT_CONFIG: dict[str, Any] = {
    "task": "classify-text",
    "model": {"name": "minilm"},
    "method": {"method": "lora", "r": 8, "alpha": 16.0, "targets": ["query", "value"]},
    "adapter_name": "bbc",
    "data": {"name": "bbc-news", "max_length": 128},
    "optimizer": {"name": "adamw", "lr": 2e-3},
    "schedule": {"epochs": 2, "batch_size": 16},
    "output": {"dir": "runs/bbc-lora"},
    "seed": 0,
}
