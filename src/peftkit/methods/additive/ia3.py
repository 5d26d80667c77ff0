"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022, arXiv:2205.05638).

    keys, values: h = l ⊙ (W x + b);   feed-forward: h = W (l ⊙ x) + b;   l ∈ R^{out} (resp. R^{in}), l = 1 at start

Only the vectors l train; starting at 1 the model is unchanged. Both forms fold into the base
weight (W ← diag(l) W, b ← l ⊙ b; W ← W diag(l)), so merging costs nothing at inference.
The feed-forward form is an input-scaling delta: the slot scales the host's input before the
host runs (one elementwise product, per row under routing), as HF PEFT does. Several active
feed-forward vectors on one host multiply, as their folds do.
Config and tensors follow HF PEFT's IA3Config (`feedforward` = `feedforward_modules`, PEFT's
`ia3_l` shapes: (out, 1), feed-forward (1, in)). Hosts: Linear, GPT-2 Conv1D.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from ...core.config import AdapterConfig, TargetSpec, register_method
from ...core.delta import Delta, DeltaBank, Placement
from ...core.hf_peft import PeftKeys
from ...core.hosts import LINEAR_TYPES, host_shape
from ...core.routing import RoutingPlan
from ...core.slot import row_scales
from ...core.targets import TYPE_PREFIX
from .channel_scale import Axis, fold_, fold_refusal, unfold_


@register_method
class IA3(PeftKeys, AdapterConfig):
    """(IA)³ config: `targets` get a learned scale; those also in `feedforward` scale their input."""

    method: ClassVar[str] = "ia3"
    feedforward: TargetSpec | None = Field(
        None, description="targeted modules that scale their input (names or dotted suffixes, or a regex)")

    @field_validator("feedforward")
    @classmethod
    def _names_or_regex(cls, value: TargetSpec | None) -> TargetSpec | None:
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"feedforward regex {value!r} is invalid: {err}") from None
        elif value is not None and any(not isinstance(v, str) or v.startswith(TYPE_PREFIX) for v in value):
            raise ValueError("feedforward takes module names, dotted suffixes or a regex (not module types), "
                             "so the choice can be saved for HF PEFT")
        return value

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def feedforward_hosts(self, names: list[str]) -> set[str]:
        """The adapted modules (by name) that scale their input; each list entry must match one."""
        spec = self.feedforward
        if spec is None:
            return set()
        if isinstance(spec, str):
            return {n for n in names if re.fullmatch(spec, n)}
        found: set[str] = set()
        for entry in spec:
            hits = {n for n in names if n == entry or n.endswith("." + entry)}
            if not hits:
                raise ValueError(f"feedforward entry {entry!r} matches none of the targeted modules")
            found |= hits
        return found

    def build_all(self, hosts: dict[str, nn.Module]) -> Iterator["IA3Delta"]:
        feedforward = self.feedforward_hosts(list(hosts))
        for name, host in hosts.items():
            yield IA3Delta(host, name in feedforward)

    # --- Hugging Face PEFT interop -------------------------------------------------------
    peft_type: ClassVar[str] = "IA3"
    _PEFT_KEY: ClassVar[re.Pattern] = re.compile(r"(.*)\.ia3_(l)")
    _PEFT_TENSOR_PREFIX: ClassVar[str] = "ia3_"

    def to_peft(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type, "target_modules": self.targets, "exclude_modules": self.exclude,
            "feedforward_modules": self.feedforward, "fan_in_fan_out": False, "init_ia3_weights": True,
            "modules_to_save": self.modules_to_save or None, "task_type": None, "inference_mode": True,
        }

    def pack_peft(self, tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Pin both module lists by full name: PEFT matches feedforward by plain suffix and wants it ⊆ targets."""
        hosts = [key.rpartition(".")[0] for key in tensors if key.endswith(".ia3_l")]
        feedforward = self.feedforward_hosts(hosts)
        pinned = {"target_modules": hosts, "exclude_modules": None,
                  "feedforward_modules": [h for h in hosts if h in feedforward]}
        return pinned, tensors

    @classmethod
    def from_peft(cls, peft: dict[str, Any], modules_to_save: list[str]) -> "IA3":
        cls.check_peft_options(peft)
        hosts, spec = peft["target_modules"], peft.get("feedforward_modules") or []
        # PEFT's own rule: a regex must match the whole name, a list entry is a plain suffix
        feedforward = [h for h in hosts
                       if (re.fullmatch(spec, h) if isinstance(spec, str) else any(h.endswith(s) for s in spec))]
        return cls(targets=hosts, feedforward=feedforward, modules_to_save=modules_to_save)

    @staticmethod
    def peft_tensor_name(tensor_name: str, host: nn.Module) -> str:
        return tensor_name


class IA3Delta(Delta):
    """One learned vector on one host: rescales its output (transform) or, feed-forward, its input."""

    additive = False

    def __init__(self, host: nn.Module, feedforward: bool):
        super().__init__()
        shape = host_shape(host)
        self.feedforward = feedforward
        self.placement = Placement.INPUT if feedforward else Placement.OUTPUT
        self.reads_input = feedforward  # the output form rescales the host output only
        size = (1, shape.in_features) if feedforward else (shape.out_features, 1)  # PEFT's layout
        # float32 on a half-precision base, as in HF PEFT
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=torch.float32, device=host.weight.device))

    def input_scale(self) -> torch.Tensor:
        return self.ia3_l.flatten()  # h = W (l ⊙ x) + b

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return (out.to(self.ia3_l.dtype) * self.ia3_l.flatten()).to(out.dtype)  # l ⊙ (W x + b)

    @classmethod
    def add_routed_batch_(cls, deltas: dict[str, "IA3Delta"], plan: RoutingPlan, x: torch.Tensor, out: torch.Tensor,
                          bank: DeltaBank | None) -> tuple[str, ...]:
        """Many output vectors in one batch without gradients: each row takes its adapter's l (1 for rows of other
        adapters) and the whole output is scaled in place by one multiply, instead of a gather, a scale and a scatter
        per adapter group. With gradients the group loop keeps `out` intact for l's gradient."""
        if torch.is_grad_enabled() or not out.is_contiguous():
            return ()
        names = tuple(deltas)
        scale = row_scales(plan, names, [d.ia3_l.flatten() for d in deltas.values()], out)
        if out.dtype == scale.dtype:
            out.mul_(scale)
        else:  # a half-precision base: scaled in l's precision, as `transform` does
            out.copy_(out.to(scale.dtype) * scale)
        return names

    @property
    def _axis(self) -> Axis:
        return "in" if self.feedforward else "out"

    def commutes_with(self, other: Delta) -> bool:
        """Two diagonal scalings on the same side of W commute (no shift): l1 ⊙ (l2 ⊙ h) = l2 ⊙ (l1 ⊙ h)."""
        return isinstance(other, IA3Delta) and other.feedforward == self.feedforward

    def merge_refusal(self, host: nn.Module) -> str | None:
        return fold_refusal(host, self.ia3_l.detach().flatten())

    def merge_into(self, host: nn.Module) -> None:
        fold_(host, self.ia3_l.detach().flatten(), self._axis)

    def unmerge_from(self, host: nn.Module) -> None:
        unfold_(host, self.ia3_l.detach().flatten(), self._axis)
