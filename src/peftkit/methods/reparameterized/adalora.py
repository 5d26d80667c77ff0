"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., 2023, arXiv:2303.10512).

    h = W0 x + α/(r + 1e-5) · P Λ Q x,   P ∈ R^{out×r}, Λ = diag(λ_1..λ_r), Q ∈ R^{r×in},   r = init_r

ΔW in SVD form. Λ starts at zero (an exact no-op), P and Q at N(0, 0.02²), and the scaling
divides by init_r as HF PEFT does (its `ranknum`, 1e-5 included). `AdaLoRAController`
scores every triplet (λ_i, P_{:,i}, Q_{i,:}) by smoothed sensitivity × uncertainty and zeroes
the singular values of the lowest-scored ones across all layers, shrinking the total rank
cubically from init_r per layer to target_r per layer; `regularizer()` keeps P and Q
near-orthogonal. The pruned triplets' Λ stay zero, so ΔW = s·P diag(Λ) Q still merges.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from ...core.config import AdapterConfig, register_method
from ...core.hf_peft import PeftKeys
from ...core.hosts import LINEAR_TYPES
from ...core.registry import get_registry
from ...core.slot import delta_of
from ...core.training import TrainingContext, TrainingStep
from .lora import LoRA, LoRADelta

_RANK_DIM = {"lora_A": 0, "lora_B": 1, "lora_E": 0}  # Q [r, in], P [out, r], Λ [r, 1]: HF PEFT's names and layouts


@register_method
class AdaLoRA(PeftKeys, AdapterConfig):
    """AdaLoRA config: starting and target rank per layer, the pruning schedule, the score EMAs."""

    method: ClassVar[str] = "adalora"
    needs_gradients: ClassVar[str | None] = "its rank allocation scores triplets by |w · ∂L/∂w|"
    init_r: int = Field(12, gt=0, description="starting rank of every adapted layer")
    target_r: int = Field(8, gt=0, description="average rank per layer left after the schedule")
    alpha: float = Field(8.0, gt=0, description="scaling numerator: s = alpha / init_r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of Q")
    total_step: int | None = Field(None, gt=0, description="training steps the schedule spans (unset: peftkit train "
                                                            "fills in the run's optimizer steps)")
    tinit: int = Field(0, ge=0, description="warm-up steps at the full budget")
    tfinal: int = Field(0, ge=0, description="final steps at the target budget, with ranks frozen")
    deltaT: int = Field(1, gt=0, description="steps between two budget allocations")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0, description="weight of the orthogonality regularizer")

    @model_validator(mode="after")
    def _schedule_fits(self) -> "AdaLoRA":
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} is a budget larger than the total rank init_r={self.init_r}: "
                             "AdaLoRA only prunes")
        if self.total_step is not None and self.tinit + self.tfinal >= self.total_step:
            raise ValueError(f"tinit + tfinal = {self.tinit + self.tfinal} leaves no budgeting phase in "
                             f"total_step={self.total_step}: it must be smaller")
        return self

    @property
    def scaling(self) -> float:
        return self.alpha / (self.init_r + 1e-5)  # PEFT: lora_alpha / (ranknum + 1e-5), ranknum = init_r

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def build(self, host: nn.Module) -> "AdaLoRADelta":
        if self.total_step is None:
            raise ValueError("AdaLoRA's total_step is unset: give the training steps its schedule spans "
                             "(peftkit train and run_training fill it in from the run)")
        return AdaLoRADelta(host, self)

    def fill_from_run(self, total_steps: int) -> "AdaLoRA":
        """The schedule spans the whole run unless total_step was given."""
        return self if self.total_step is not None else self.model_validate({**self.model_dump(), "total_step": total_steps})

    def training_steps(self, context: TrainingContext) -> list[TrainingStep]:
        """Rank allocation after every optimizer step, and the orthogonality regularizer in the loss."""
        return [RankAllocation(AdaLoRAController(context.model, context.adapter))]

    # --- Hugging Face PEFT interop: PEFT saves only the kept triplets, listed in `rank_pattern` ---
    peft_type: ClassVar[str] = "ADALORA"
    _PEFT_KEY: ClassVar[re.Pattern] = re.compile(r"(.*)\.(lora_[ABE])")
    _SCHEDULE: ClassVar[tuple[str, ...]] = ("init_r", "target_r", "total_step", "tinit", "tfinal", "deltaT",
                                            "beta1", "beta2", "orth_reg_weight")

    def to_peft(self) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": self.targets, "exclude_modules": self.exclude, "bias": "none",
                "init_lora_weights": True, "modules_to_save": self.modules_to_save or None, "task_type": None,
                "inference_mode": True, "fan_in_fan_out": False, **{k: getattr(self, k) for k in self._SCHEDULE}}

    @classmethod
    def from_peft(cls, peft: dict[str, Any], modules_to_save: list[str]) -> "AdaLoRA":
        cls.check_peft_options(peft)
        schedule = {k: peft[k] for k in cls._SCHEDULE if peft.get(k) is not None}
        return cls(alpha=peft.get("lora_alpha", 8), dropout=peft.get("lora_dropout", 0.0),
                   targets=peft["target_modules"], modules_to_save=modules_to_save, **schedule)

    @staticmethod
    def peft_tensor_name(tensor_name: str, host: nn.Module) -> str:
        return tensor_name  # PEFT keeps AdaLoRA's factors as bare parameters: no ".weight"


    def pack_peft(self, tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Drop the pruned triplets and list the kept ones; a pruned λ that grew back since is kept (exact output)."""
        pattern, out = {}, dict(tensors)
        for host in [k.removesuffix(".rank_mask") for k in tensors if k.endswith(".rank_mask")]:
            keep = out.pop(f"{host}.rank_mask") | (tensors[f"{host}.lora_E"][:, 0] != 0)  # [r]
            pattern[f"{host}.lora_E"] = keep.tolist()
            for name, dim in _RANK_DIM.items():
                out[f"{host}.{name}"] = tensors[f"{host}.{name}"].index_select(dim, keep.nonzero()[:, 0])
        return {"rank_pattern": pattern}, out

    def unpack_peft(self, peft: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Put PEFT's kept triplets back at their places among init_r (the pruned ones: zero) and rebuild the masks."""
        pattern, out = peft.get("rank_pattern") or {}, dict(tensors)
        for host in [k.removesuffix(".lora_E") for k in tensors if k.endswith(".lora_E")]:
            keep = torch.tensor(pattern.get(f"{host}.lora_E", [True] * self.init_r), dtype=torch.bool)
            kept = keep.nonzero()[:, 0]
            for name, dim in _RANK_DIM.items():
                saved = tensors[f"{host}.{name}"]
                if keep.shape[0] != self.init_r or saved.shape[dim] != kept.shape[0]:
                    raise ValueError(f"{host}.{name}: shape {tuple(saved.shape)} does not fit its rank_pattern "
                                     f"({int(keep.sum())} of {keep.shape[0]} kept) and init_r={self.init_r}")
                full = list(saved.shape)
                full[dim] = self.init_r
                out[f"{host}.{name}"] = saved.new_zeros(full).index_copy_(dim, kept, saved)
            out[f"{host}.rank_mask"] = keep
        return out


class AdaLoRADelta(LoRADelta):
    """P Λ Q on one linear host, reusing LoRA's down projection (dropout, shared q/k/v matmul) for Q x."""

    def __init__(self, host: nn.Module, config: AdaLoRA):
        super().__init__(host, LoRA(r=config.init_r, dropout=config.dropout, targets=config.targets))
        self.scaling = config.scaling
        self.lora_E = nn.Parameter(self.lora_A.new_zeros(config.init_r, 1))  # Λ as a column [r, 1]: zero, a no-op
        self.register_buffer("rank_mask", torch.ones(config.init_r, dtype=torch.bool, device=self.lora_A.device))
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self._down(x) * self.lora_E[:, 0], self.lora_B) * self.scaling  # [..., out]

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float())) * self.scaling  # [out, in]

    @torch.no_grad()
    def keep(self, mask: torch.Tensor) -> None:
        """Keep the triplets in `mask` and zero the others' singular values."""
        self.rank_mask.copy_(mask)
        self.lora_E.masked_fill_(~mask[:, None], 0.0)


class AdaLoRAController:
    """Rank allocation for one AdaLoRA adapter. Each training step, after `optimizer.step()` and before
    `zero_grad()` (the gradients are read): `update(step)`. Add `regularizer()` to the loss."""

    def __init__(self, model: nn.Module, name: str = "default"):
        config = get_registry(model).require(name)
        if not isinstance(config, AdaLoRA):
            raise TypeError(f"adapter {name!r} is {config.method}, not adalora")
        self.config = config
        self.deltas: dict[str, AdaLoRADelta] = {
            host: delta for host in get_registry(model).hosts[name]
            if isinstance(delta := delta_of(model.get_submodule(host), name), AdaLoRADelta)}
        self.init_budget = config.init_r * len(self.deltas)
        self.target_budget = config.target_r * len(self.deltas)
        self._sensitivity = {(h, p): torch.zeros_like(getattr(d, p)) for h, d in self.deltas.items() for p in _RANK_DIM}
        self._uncertainty = {key: torch.zeros_like(value) for key, value in self._sensitivity.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The smoothed importance scores, which carry from step to step (a checkpoint needs them)."""
        scores = (("sensitivity", self._sensitivity), ("uncertainty", self._uncertainty))
        return {f"{kind}.{host}.{param}": value for kind, table in scores for (host, param), value in table.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.state_dict()
        if state.keys() != mine.keys():
            raise ValueError("the checkpoint's AdaLoRA importance scores are for other layers than this adapter's")
        for key, value in mine.items():
            value.copy_(state[key])

    def budget(self, step: int) -> int:
        """Total rank allowed at `step`: all of it until tinit, then a cubic decay to the target at total_step − tfinal."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget
        remaining = max(0.0, 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit))
        return int((self.init_budget - self.target_budget) * remaining**3 + self.target_budget)

    def update(self, step: int) -> None:
        """Smooth the importance scores; every deltaT steps, keep the `budget(step)` best triplets across layers."""
        c, final = self.config, self.config.total_step - self.config.tfinal
        if step > final:  # ranks are frozen: re-zero the pruned Λ that the optimizer moved
            for delta in self.deltas.values():
                delta.keep(delta.rank_mask)
            return
        if step < final:
            self._smooth()
        if step == final or (step > c.tinit and step % c.deltaT == 0):
            self._allocate(self.budget(step))

    @torch.no_grad()
    def _smooth(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for (host, name), sensitivity in self._sensitivity.items():
            param = getattr(self.deltas[host], name)
            if param.grad is None:
                raise RuntimeError(f"{host}.{name} has no gradient: call update(step) after backward(), before zero_grad()")
            importance = (param * param.grad).abs()  # I = |w · ∂L/∂w|
            sensitivity.mul_(b1).add_(importance, alpha=1 - b1)  # Ī: smoothed sensitivity
            self._uncertainty[host, name].mul_(b2).add_((importance - sensitivity).abs(), alpha=1 - b2)  # Ū

    def _score(self, host: str) -> torch.Tensor:
        """S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij), with s = Ī · Ū elementwise: [r]."""
        s = {name: self._sensitivity[host, name] * self._uncertainty[host, name] for name in _RANK_DIM}
        return s["lora_E"][:, 0] + s["lora_B"].mean(0) + s["lora_A"].mean(1)

    def _allocate(self, budget: int) -> None:
        scores = torch.cat([self._score(host) for host in self.deltas])  # [layers · r]
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[scores.topk(budget).indices] = True  # exactly `budget` survive (PEFT's `<= threshold` drops all ties)
        for delta, mask in zip(self.deltas.values(), keep.split(self.config.init_r)):
            delta.keep(mask)

    def ranks(self) -> dict[str, int]:
        """Triplets each layer kept at the last allocation (init_r before the first)."""
        return {host: int(delta.rank_mask.sum()) for host, delta in self.deltas.items()}

    def regularizer(self) -> torch.Tensor:
        """γ · mean over layers of ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F (the paper's R(P, Q); PEFT averages unsquared norms)."""
        eye = torch.eye(self.config.init_r, device=next(iter(self.deltas.values())).lora_A.device)
        terms = [((d.lora_B.T @ d.lora_B - eye) ** 2).sum() + ((d.lora_A @ d.lora_A.T - eye) ** 2).sum()
                 for d in self.deltas.values()]
        return self.config.orth_reg_weight * torch.stack(terms).mean()


class RankAllocation(TrainingStep):
    """AdaLoRA's training step: allocate ranks after each optimizer step, add the orthogonality regularizer."""

    def __init__(self, controller: AdaLoRAController):
        self.controller = controller

    def on_step_end(self, trainer: Any) -> None:
        self.controller.update(trainer.step)  # steps taken, this one included (PEFT's update_and_allocate gets the same)

    def extra_loss(self, trainer: Any) -> torch.Tensor:
        return self.controller.regularizer()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.controller.load_state_dict(state)
