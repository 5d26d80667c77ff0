"""The base of every method's config, and the registry that maps a method name to its config.

Configs are pydantic models: a wrong value or an unknown key is rejected with the field's
name, and `to_dict` / `config_from_dict` give the JSON stored next to saved weights.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from .delta import Delta
from .targets import match_targets
from .training import TrainingContext, TrainingStep

TargetSpec = str | list[str]


class AdapterConfig(BaseModel):
    """Fields every method shares: where it goes and which whole modules it trains as copies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: ClassVar[str]
    trains_base: ClassVar[bool] = False  # its training steps write into the base weights (ReLoRA's restarts)
    # Why `peftkit train` cannot train it from a fresh attach, and what makes it instead; None: it can.
    not_trained_by_run: ClassVar[str | None] = None
    # Why its training reads backward's gradients; None: a zeroth-order optimizer (MeZO), which computes none, can
    # train it.
    needs_gradients: ClassVar[str | None] = None
    # Why activation checkpointing would change its training (a forward with side effects that the recomputation in
    # backward repeats); None: it trains alike with and without.
    not_checkpointable: ClassVar[str | None] = None
    targets: TargetSpec = Field(description="modules to adapt: names / dotted suffixes / 'type:Linear', a regex, "
                                            "or 'all-linear'")
    exclude: TargetSpec | None = Field(None, description="modules to leave out, in the same syntax")
    modules_to_save: list[str] = Field([], description="whole modules (a fresh head) trained as copies")

    @field_validator("targets", "exclude", "modules_to_save", mode="before")
    @classmethod
    def _types_by_name(cls, value: Any) -> Any:
        """Module classes in a list become "type:<ClassName>", so configs stay JSON."""
        if isinstance(value, (list, tuple)):
            return [f"type:{v.__name__}" if isinstance(v, type) else v for v in value]
        return value

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, value: TargetSpec) -> TargetSpec:
        if not value:
            raise ValueError("targets must name at least one module (a name, a suffix, a regex or 'all-linear')")
        return value

    def host_types(self) -> tuple[type[nn.Module], ...]:
        """Module types this method can sit on."""
        raise NotImplementedError

    def choose_hosts(self, model: nn.Module) -> list[str]:
        """Names of the modules this adapter goes on, in model order (LLaMA-Adapter keeps only the top layers)."""
        return match_targets(model, self.targets, self.exclude, self.host_types())

    def build(self, host: nn.Module) -> Delta:
        """Create this method's delta for one host module."""
        raise NotImplementedError

    def build_all(self, hosts: dict[str, nn.Module]) -> Iterator[Delta]:
        """The deltas of one adapter, one per host (name -> module), in order.

        Lazy: attach places each delta before the next is built, so a failure can undo the ones
        placed. A method whose deltas share state across hosts (Compacter's rule matrices, VeRA's
        random bases) overrides this to create it once; one delta should register it and the
        others only reference it, so it is saved, loaded, counted and optimised once.
        """
        for host in hosts.values():
            yield self.build(host)

    def on_attach(self, model: nn.Module, name: str) -> None:
        """Optional: work on the adapter once all its deltas are placed and linked, on attach and on load
        (AdapterDrop's layer rule, SparseAdapter's masks)."""

    @property
    def rewrites_base(self) -> bool:
        """True when attaching changes the base weights themselves (PiSSA's residual)."""
        return False

    def fill_from_run(self, total_steps: int) -> "AdapterConfig":
        """This config with the fields only the run knows filled in (AdaLoRA's total_step), before attach.

        Most methods need none; a field the user set is kept."""
        return self

    def training_steps(self, context: TrainingContext) -> list[TrainingStep]:
        """What this method does around training (see `core.training`); most methods need nothing.

        Called after attach and before the optimizer is made: a selection on data runs here, since it
        changes which parameters are trained. The steps returned run inside the loop, before user callbacks."""
        return []

    def optimizer_groups(self, model: nn.Module, adapter: str, lr: float) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups for this adapter's trainable parameters at base learning rate `lr`
        (LoRA+'s faster B factors); None, as for most methods: one group. Parameters left out of the groups
        are trained in a group of their own at `lr`."""
        return None

    def saved_config(self) -> "AdapterConfig":
        """The config written beside saved weights (a method may save an equivalent plain form)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.model_dump(mode="json")}


METHODS: dict[str, type[AdapterConfig]] = {}


def register_method(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make a config loadable by its `method` name."""
    METHODS[cls.method] = cls
    return cls


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from `to_dict` output; an unknown method or field is a named error."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown PEFT method {method!r}{hint}; known methods: {', '.join(sorted(METHODS))}")
    try:
        return METHODS[method](**data)
    except ValidationError as err:
        raise ValueError(f"invalid {method} config: {validation_message(err)}") from None


def validation_message(err: ValidationError) -> str:
    """Every bad field as `path: message` on one line: pydantic's own text spans lines and links its docs,
    which buries the field name in a command-line error."""
    parts = []
    for error in err.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
