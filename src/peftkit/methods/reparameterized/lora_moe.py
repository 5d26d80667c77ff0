"""Mixture of LoRA experts: E LoRA experts on each host and a trained router that sends every token to its top k,
with Switch Transformer's load-balancing loss (Fedus, Zoph & Shazeer, 2021, arXiv:2101.03961; top-k gating as in
Mixtral, Jiang et al., 2024, arXiv:2401.04088; LoRA experts as in MixLoRA, Li et al., 2024, arXiv:2404.15159, and
MoLoRA, Zadouri et al., 2023, arXiv:2309.05444, which is the case k = E):

    h = W0 x + s · Σ_{e ∈ top-k(p)} g_e B_e A_e x,   p = softmax(W_g x),   g_e = p_e / Σ_{e' ∈ top-k(p)} p_e'
    L_bal = E · Σ_e f_e · P_e,   f_e: the share of the N·k token→expert assignments that go to e,
                                 P_e = (1/N) Σ_tokens p_e                  (1 when perfectly balanced)

A_e ∈ R^{r×in}, B_e ∈ R^{out×r} (B_e = 0 at start: a fresh adapter changes nothing), s = α/r, W_g ∈ R^{E×in}. Each
token of each row is routed on its own, so a row's output never depends on the other rows (per-row adapter routing
holds). While training, every forward pass records L_bal on each host; the method's training step adds
balance_weight · (their mean) to each optimizer step's loss (in a loop of your own, add `lora_moe_balance_loss`).
L_bal is recorded on its own graph from the host's input taken as given, so it trains the routers only (Switch's
also reaches the layers below through x) and it can be differentiated after the task loss's backward pass.
`expert_usage` reports each expert's share of the assignments, counted in every forward pass. The gates depend on
each token, so the adapter has no single weight change: it is not merged into the base nor with other adapters.
Hosts: Linear (and GPT-2's Conv1D).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ...core.config import AdapterConfig, register_method
from ...core.delta import Delta
from ...core.hosts import LINEAR_TYPES, host_shape
from ...core.registry import adapter_deltas, get_registry
from ...core.training import TrainingContext, TrainingStep
from .lora import _check_rank


@register_method
class LoRAMoE(AdapterConfig):
    """Mixture-of-LoRA-experts config: experts, top-k, each expert's rank and scaling, and the balance loss."""

    method: ClassVar[str] = "lora_moe"
    needs_gradients: ClassVar[str | None] = "its load-balancing loss is recorded only in passes that build a graph"
    not_checkpointable: ClassVar[str | None] = ("every forward records its load-balancing loss and expert counts, so a "
                                                "block recomputed in backward would record them twice")
    experts: int = Field(4, ge=2, description="E: LoRA experts per module")
    top_k: int = Field(2, ge=1, description="experts each token is sent to (k = E: a soft mixture)")
    r: int = Field(8, gt=0, description="rank of each expert")
    alpha: float = Field(8.0, gt=0, description="scaling numerator: s = alpha/r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the experts' input")
    balance_weight: float = Field(0.01, ge=0, description="weight of the load-balancing loss (Switch: 0.01)")
    router_std: float = Field(0.02, gt=0, description="std of the router's normal init (Mixtral's 0.02)")

    @model_validator(mode="after")
    def _k_within_experts(self) -> "LoRAMoE":
        if self.top_k > self.experts:
            raise ValueError(f"top_k = {self.top_k} exceeds the {self.experts} experts")
        return self

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def build_all(self, hosts: dict[str, nn.Module]) -> Iterator[Delta]:
        """One delta per host, all recording their balance terms into one record of the adapter."""
        record = BalanceRecord()
        for name, host in hosts.items():
            _check_rank(name, host, self.r)
            yield LoRAMoEDelta(host, self, record)

    def training_steps(self, context: TrainingContext) -> list[TrainingStep]:
        return [BalanceLoss(context.model, context.adapter)] if self.balance_weight > 0 else []


class BalanceRecord:
    """The balance terms L_bal of one adapter's hosts since they were last taken (graphs reaching the routers)."""

    def __init__(self) -> None:
        self.terms: list[torch.Tensor] = []

    def take(self) -> torch.Tensor | None:
        """The mean of the recorded terms (None if none), and a fresh start."""
        terms, self.terms = self.terms, []
        return torch.stack(terms).mean() if terms else None

    def __deepcopy__(self, memo: dict[int, Any]) -> "BalanceRecord":
        return BalanceRecord()  # terms belong to the pass that made them, not to a copy of the model


class LoRAMoEDelta(Delta):
    """E LoRA experts and a router on one host: increment(x) = s · Σ_e g_e(x) B_e A_e dropout(x), per token."""

    def __init__(self, host: nn.Module, config: LoRAMoE, record: BalanceRecord):
        super().__init__()
        shape = host_shape(host)
        factory = {"dtype": torch.float32, "device": host.weight.device}
        experts, r = config.experts, config.r
        self.lora_A = nn.Parameter(torch.empty(experts, r, shape.in_features, **factory))  # [E, r, in]
        self.lora_B = nn.Parameter(torch.zeros(experts, shape.out_features, r, **factory))  # [E, out, r]
        self.router = nn.Parameter(torch.empty(experts, shape.in_features, **factory))  # W_g [E, in]
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # each expert's A as LoRA's
        nn.init.normal_(self.router, std=config.router_std)
        self.register_buffer("assignments", torch.zeros(experts, **factory), persistent=False)  # tokens per expert
        self.top_k, self.scaling = config.top_k, config.scaling
        self.record_balance = config.balance_weight > 0
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.record = record

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)  # [N, in]
        probs = F.linear(tokens, self.router).softmax(-1)  # p [N, E]
        top_p, top_e = probs.topk(self.top_k, dim=-1)  # [N, k]
        gates = torch.zeros_like(probs).scatter(-1, top_e, top_p / top_p.sum(-1, keepdim=True))  # g, 0 off top-k
        self._count(tokens, top_e)
        experts, rank, _ = self.lora_A.shape
        down = F.linear(self.dropout(tokens), self.lora_A.reshape(experts * rank, -1)).view(-1, experts, rank)
        up_weight = self.lora_B.permute(1, 0, 2).reshape(self.lora_B.shape[1], experts * rank)  # [B_1 | ... | B_E]
        out = F.linear((down * gates[..., None]).flatten(1), up_weight) * self.scaling  # [N, out]
        return out.view(*x.shape[:-1], -1)

    def _count(self, tokens: torch.Tensor, top_e: torch.Tensor) -> None:
        """Count the assignments (for `expert_usage`) and, while training, record L_bal on its own graph."""
        experts = self.router.shape[0]
        with torch.no_grad():
            counts = torch.bincount(top_e.flatten(), minlength=experts).to(self.assignments.dtype)
            self.assignments += counts
        if self.record_balance and self.training and torch.is_grad_enabled() and tokens.shape[0]:
            mean_probs = F.linear(tokens.detach(), self.router).softmax(-1).mean(0)  # P_e
            self.record.terms.append(experts * (counts / top_e.numel() * mean_probs).sum())

    def merge_refusal(self, host: nn.Module) -> str | None:
        return ("a mixture of LoRA experts gates its experts per token: it has no single weight change to fold into "
                "the base weights")


def _moe_deltas(model: nn.Module, name: str) -> dict[str, LoRAMoEDelta]:
    config = get_registry(model).require(name)
    if not isinstance(config, LoRAMoE):
        raise ValueError(f"adapter {name!r} is {config.method}, not lora_moe")
    return {host: delta for host, _, delta in adapter_deltas(model, name) if isinstance(delta, LoRAMoEDelta)}


def lora_moe_balance_loss(model: nn.Module, name: str = "default") -> torch.Tensor | None:
    """balance_weight · the mean L_bal over the hosts and forward passes since the last call (None if no training
    pass ran): the term to add to the loss in a training loop of your own."""
    deltas = _moe_deltas(model, name)
    term = next(iter(deltas.values())).record.take()
    return None if term is None else get_registry(model).require(name).balance_weight * term


def expert_usage(model: nn.Module, name: str = "default", reset: bool = False) -> dict[str, list[float]]:
    """Each host's share of token→expert assignments per expert, over the forward passes since attach or the last
    reset (an unused host: zeros)."""
    usage = {}
    for host_name, delta in _moe_deltas(model, name).items():
        total = float(delta.assignments.sum())
        usage[host_name] = [float(c) / total if total else 0.0 for c in delta.assignments]
        if reset:
            delta.assignments.zero_()
    return usage


class BalanceLoss(TrainingStep):
    """The method's training step: balance_weight · L_bal (mean over hosts and the step's passes) in each optimizer
    step's loss; `history` keeps each step's L_bal."""

    def __init__(self, model: nn.Module, adapter: str):
        self.model, self.adapter = model, adapter
        self.weight = get_registry(model).require(adapter).balance_weight
        self.history: list[float] = []
        lora_moe_balance_loss(model, adapter)  # drops terms of passes before training (and checks the adapter)

    def extra_loss(self, trainer: Any) -> torch.Tensor | None:
        term = lora_moe_balance_loss(self.model, self.adapter)
        if term is not None:
            self.history.append(float(term.detach()) / self.weight)
        return term
