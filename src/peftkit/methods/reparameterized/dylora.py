"""DyLoRA: dynamic search-free low-rank adaptation (Valipour et al., 2023, arXiv:2210.07558).

    h = W0 x + (α/b) · B[:, :b] A[:b] x,   b ~ U{r_min, …, r_max} per training step, b = the chosen rank in eval

One pair of rank r_max is trained so that every leading truncation of rank b ∈ [r_min, r_max]
is a good LoRA of its own (nested dropout on the rank). After training, any rank in the range
is picked with `set_rank` (used in eval and by merge) or `dylora_truncate` (drops the trailing
factors, e.g. right after `peftkit.load`, so the adapter is saved at that rank).

Sampling: `dylora_sample_rank(model, name)` draws one b with torch's RNG and gives it to every
layer of the adapter; the method's training step calls it after every optimizer step (by hand: once per step).
Until the first call the adapter trains at r_max. All of A[:b], B[:, :b] train (the paper's
"frozen" ablation, which updates only the b-th component, is left out). Hosts: Linear, Conv1D.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ...core.registry import adapter_deltas
from ...core.config import AdapterConfig, register_method
from ...core.hosts import LINEAR_TYPES
from ...core.registry import get_registry
from ...core.training import TrainingContext, TrainingStep
from .lora import LoRA, LoRADelta


@register_method
class DyLoRA(AdapterConfig):
    """DyLoRA config: the rank range trained, the scaling numerator and dropout on A's input."""

    method: ClassVar[str] = "dylora"
    r_min: int = Field(1, ge=1, description="smallest rank sampled in training")
    r_max: int = Field(8, ge=1, description="largest rank: the size of A and B")
    alpha: float = Field(8.0, gt=0, description="scaling numerator: s = alpha/b at rank b")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of A")

    @model_validator(mode="after")
    def _range_not_empty(self) -> "DyLoRA":
        if self.r_min > self.r_max:
            raise ValueError(f"r_min ({self.r_min}) must not exceed r_max ({self.r_max})")
        return self

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def build(self, host: nn.Module) -> "DyLoRADelta":
        return DyLoRADelta(host, self)

    def training_steps(self, context: TrainingContext) -> list[TrainingStep]:
        """A new rank b ~ U{r_min..r_max} after every optimizer step: the next step trains the first b rows."""
        return [SampleRank(context)]


class DyLoRADelta(LoRADelta):
    """A rank-r_max LoRA pair run at a truncated rank: the sampled one in training, the chosen one in eval."""

    def __init__(self, host: nn.Module, config: DyLoRA):
        super().__init__(host, LoRA(r=config.r_max, alpha=config.alpha, dropout=config.dropout, targets=config.targets))
        self.alpha = config.alpha
        self.train_rank = self.eval_rank = config.r_max

    def rank(self) -> int:
        return self.train_rank if self.training else self.eval_rank

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        b = self.rank()
        down = self._down(x)[..., :b]  # [..., b]: slicing the full projection keeps the shared-input matmul
        return F.linear(down, self.lora_B[:, :b]) * (self.alpha / b)

    def delta_weight(self) -> torch.Tensor:
        k = self.eval_rank
        return (self.lora_B[:, :k].float() @ self.lora_A[:k].float()) * (self.alpha / k)  # [out, in]

    @torch.no_grad()
    def truncate(self, k: int) -> None:
        """Keep only the leading k components (new parameters: rebuild any optimizer afterwards)."""
        self.lora_A = nn.Parameter(self.lora_A[:k].clone(), requires_grad=self.lora_A.requires_grad)  # [k, in]
        self.lora_B = nn.Parameter(self.lora_B[:, :k].clone(), requires_grad=self.lora_B.requires_grad)  # [out, k]
        self.train_rank = self.eval_rank = k


def _dylora(model: nn.Module, name: str) -> tuple[DyLoRA, list[DyLoRADelta]]:
    config = get_registry(model).require(name)
    if not isinstance(config, DyLoRA):
        raise ValueError(f"adapter {name!r} is a {config.method} adapter, not DyLoRA")
    return config, [delta for _, _, delta in adapter_deltas(model, name) if isinstance(delta, DyLoRADelta)]  # not task heads


def _check_rank(model: nn.Module, name: str, config: DyLoRA, k: int) -> None:
    if not config.r_min <= k <= config.r_max:
        raise ValueError(f"rank {k} is outside adapter {name!r}'s trained range [{config.r_min}, {config.r_max}]")
    if name in get_registry(model).merged:  # unmerge must subtract the ΔW that merge added
        raise ValueError(f"adapter {name!r} is merged; unmerge it before changing its rank")


def dylora_sample_rank(model: nn.Module, name: str = "default", generator: torch.Generator | None = None) -> int:
    """Draw the training rank b ~ U{r_min..r_max} for every layer of adapter `name`; returns b."""
    config, deltas = _dylora(model, name)
    b = int(torch.randint(config.r_min, config.r_max + 1, (1,), generator=generator))
    for delta in deltas:
        delta.train_rank = b
    return b


def set_rank(model: nn.Module, name: str, k: int) -> None:
    """Use rank k of DyLoRA adapter `name` in eval forward passes and merges."""
    config, deltas = _dylora(model, name)
    _check_rank(model, name, config, k)
    for delta in deltas:
        delta.eval_rank = k


def dylora_truncate(model: nn.Module, name: str, k: int) -> None:
    """Cut DyLoRA adapter `name` down to rank k for good: its config becomes r_max = k (saved that way)."""
    config, deltas = _dylora(model, name)
    _check_rank(model, name, config, k)
    for delta in deltas:
        delta.truncate(k)
    get_registry(model).configs[name] = config.model_copy(update={"r_max": k})


class SampleRank(TrainingStep):
    """DyLoRA's training step: sample the rank the next optimizer step trains."""

    def __init__(self, context: TrainingContext):
        self.model, self.adapter = context.model, context.adapter

    def on_step_end(self, trainer: Any) -> None:
        dylora_sample_rank(self.model, self.adapter)
