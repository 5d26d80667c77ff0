"""Structured selective fine-tuning: train whole attention heads and whole FFN units, chosen by importance
(head importance after Michel, Levy & Neubig, 2019, "Are Sixteen Heads Really Better than One?",
arXiv:1905.10650; a unit's score is the sum of its parameters' scores, as in FishMask).

    head h:      rows of W_q, W_k, W_v (and their bias entries) for h  +  columns of W_o for h
    FFN unit i:  row i of W_up (and W_gate, and the bias entry)  +  column i of W_down
    I(u) = Σ_{θ ∈ u} F̂_θ  (empirical Fisher)  or  Σ_{θ ∈ u} |θ|;   train the round(f·U) units of highest I

Units of one kind compete across all layers (U: every head, or every FFN unit, of the targets). In a
grouped-query model (Llama: fewer key/value heads than query heads) the unit is a key/value head
together with the query heads that read it, since their k/v rows cannot be split. The chosen
parameters form dense row or column blocks (`Mask.slices`), stored as the blocks' values plus their
positions. Attach leaves the adapter unselected; `select_units(model, name, batches)` chooses (the
Fisher needs a few training batches; `score="magnitude"` needs none). Knows BERT-style attention
(`self.query/key/value` + `output.dense`) and Llama-style attention (`q_proj/k_proj/v_proj/o_proj`, also
Dinov2's and ViT's), BERT-style FFNs (`intermediate.dense` + `output.dense`), ViT-style MLPs (`fc1` + `fc2`) and
gated or plain `up_proj`/`down_proj` FFNs;
anything else (GPT-2's fused `c_attn`) is a `StructureError`.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ...core.config import TargetSpec, register_method
from ...core.registry import get_registry
from ...core.targets import match_targets
from ...core.training import TrainingContext, TrainingStep
from .mask import Mask
from .selection import Fraction, LossFn, NoDataError, SelectionError, candidates, fisher_scores, install_masks
from .sparse import SelectiveConfig

UnitKind = Literal["heads", "ffn"]


class StructureError(ValueError):
    """A model whose attention heads or FFN units cannot be found, or targets that split a unit."""


@dataclass(frozen=True)
class Member:
    """One host's share of every unit: `width` consecutive rows (dim 0) or columns (dim 1) per unit."""

    host: str
    dim: int
    width: int


@dataclass(frozen=True)
class UnitGroup:
    """The units of one attention or FFN block: unit u is positions [u·width, (u+1)·width) of every member."""

    kind: UnitKind
    units: int
    members: tuple[Member, ...]

    def unit_scores(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the parameter scores inside each unit: [units]. Row members count their bias entries too."""
        total = torch.zeros(self.units)
        for m in self.members:
            for param in ("weight", "bias") if m.dim == 0 else ("weight",):
                score = scores.get(f"{m.host}.{param}")
                if score is not None:
                    total += score.detach().float().movedim(m.dim, 0).reshape(self.units, -1).sum(1).cpu()
        return total

    def masks(self, chosen: torch.Tensor, with_bias: set[str]) -> dict[str, Mask]:
        """Slice masks of the chosen units (sorted unit indices) on every member; biases of row members in `with_bias`."""
        masks = {}
        for m in self.members:
            positions = (chosen[:, None] * m.width + torch.arange(m.width)).flatten()
            masks[f"{m.host}.weight"] = Mask.slices(m.dim, positions)
            if m.dim == 0 and f"{m.host}.bias" in with_bias:
                masks[f"{m.host}.bias"] = Mask.slices(0, positions)
        return masks


def _linears(module: nn.Module, *paths: str) -> list[nn.Linear] | None:
    found = []
    for path in paths:
        try:
            sub = module.get_submodule(path)
        except AttributeError:
            return None
        if not isinstance(sub, nn.Linear):
            return None
        found.append(sub)
    return found


def _attention(name: str, module: nn.Module) -> UnitGroup | None:
    prefix = f"{name}." if name else ""
    if _linears(module, "self.query", "self.key", "self.value", "output.dense"):  # BERT: BertAttention
        heads, size = module.self.num_attention_heads, module.self.attention_head_size
        return UnitGroup("heads", heads, tuple(Member(f"{prefix}{p}", 0, size) for p in ("self.query", "self.key", "self.value"))
                         + (Member(f"{prefix}output.dense", 1, size),))
    linears = _linears(module, "q_proj", "k_proj", "v_proj", "o_proj")
    head_dim = getattr(module, "head_dim", None)
    if linears and isinstance(head_dim, int):  # Llama / Mistral / Qwen2: kv heads with their query-head groups
        q, k, _, _ = linears
        kv_heads = k.out_features // head_dim
        if kv_heads == 0 or q.out_features % (kv_heads * head_dim):
            raise StructureError(f"{name}: {q.out_features} query rows do not split into {kv_heads} key/value groups "
                                 f"of head_dim {head_dim}")
        group = q.out_features // kv_heads
        return UnitGroup("heads", kv_heads, (Member(f"{prefix}q_proj", 0, group), Member(f"{prefix}k_proj", 0, head_dim),
                                             Member(f"{prefix}v_proj", 0, head_dim), Member(f"{prefix}o_proj", 1, group)))
    return None


def _ffn(name: str, module: nn.Module) -> UnitGroup | None:
    prefix = f"{name}." if name else ""
    bert = _linears(module, "intermediate.dense", "output.dense")  # BERT: BertLayer
    if bert and bert[0].out_features == bert[1].in_features:
        return UnitGroup("ffn", bert[0].out_features, (Member(f"{prefix}intermediate.dense", 0, 1),
                                                       Member(f"{prefix}output.dense", 1, 1)))
    fc = _linears(module, "fc1", "fc2")  # ViT / Dinov2 / CLIP: an MLP module
    if fc and fc[0].out_features == fc[1].in_features:
        return UnitGroup("ffn", fc[0].out_features, (Member(f"{prefix}fc1", 0, 1), Member(f"{prefix}fc2", 1, 1)))
    updown = _linears(module, "up_proj", "down_proj")
    if updown and updown[0].out_features == updown[1].in_features:
        rows = ("gate_proj", "up_proj") if _linears(module, "gate_proj") else ("up_proj",)
        return UnitGroup("ffn", updown[0].out_features, tuple(Member(f"{prefix}{p}", 0, 1) for p in rows)
                         + (Member(f"{prefix}down_proj", 1, 1),))
    return None


_FINDERS = {"heads": (_attention, "attention heads (BERT: attention.self.query/key/value + attention.output.dense; "
                                  "Llama: q_proj/k_proj/v_proj/o_proj with head_dim)"),
            "ffn": (_ffn, "FFN units (BERT: intermediate.dense + output.dense; Llama: gate_proj/up_proj + down_proj; "
                          "ViT: mlp.fc1 + mlp.fc2)")}


def unit_groups(model: nn.Module, kinds: Iterable[UnitKind], targets: TargetSpec = ".*",
                exclude: TargetSpec | None = None) -> list[UnitGroup]:
    """Every head / FFN block of the model whose members are all targeted, in model order.

    A block only partly targeted, or a kind with no block at all, is a StructureError.
    """
    targeted = set(match_targets(model, targets, exclude))
    modules = [(n, m) for n, m in model.named_modules() if ".peftkit." not in f".{n}."]
    groups = []
    for kind in kinds:
        finder, known = _FINDERS[kind]
        found = [g for n, m in modules if (g := finder(n, m)) is not None]
        if not found:
            raise StructureError(f"found no {known} in this {type(model).__name__}; structured masks cannot be used on it")
        for group in found:
            hosts = {m.host for m in group.members}
            if hosts & targeted and not hosts <= targeted:
                raise StructureError(f"targets split a unit: {sorted(hosts & targeted)} are targeted but "
                                     f"{sorted(hosts - targeted)} are not (a {kind} unit spans all of them)")
        groups += [g for g in found if {m.host for m in g.members} <= targeted]
    if not groups:
        raise StructureError(f"targets {targets!r} (exclude {exclude!r}) hold no complete {' or '.join(kinds)} block")
    return groups


@register_method
class StructuredMask(SelectiveConfig):
    """Structured-mask config: the share of units of each kind to train, which kinds, and how units are scored."""

    method: ClassVar[str] = "structured"
    fraction: Fraction = 0.1
    units: list[UnitKind] = Field(["heads", "ffn"], description="unit kinds; `fraction` of each kind is trained")
    score: Literal["fisher", "magnitude"] = Field("fisher", description="per-parameter score summed over a unit")
    targets: TargetSpec = ".*"

    @field_validator("units")
    @classmethod
    def _units_distinct(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"units must name 'heads' and/or 'ffn' once each, got {value}")
        return value

    def groups(self, model: nn.Module) -> list[UnitGroup]:
        return unit_groups(model, self.units, self.targets, self.exclude)

    def training_steps(self, context: TrainingContext) -> list[TrainingStep]:
        """Choose the units from a few training batches before training (by Fisher, or by magnitude)."""
        select_units(context.model, context.adapter, context.batches, context.loss_fn)
        return []

    def choose_hosts(self, model: nn.Module) -> list[str]:
        hosts = {m.host for g in self.groups(model) for m in g.members}
        return [n for n, _ in model.named_modules() if n in hosts]


def select_units(model: nn.Module, name: str, batches: Iterable[Any] | None = None,
                 loss_fn: LossFn | None = None) -> dict[str, Mask]:
    """Score the units of structured adapter `name`, install the top `fraction` of each kind; returns the masks.

    `batches` (and `loss_fn`, as in `peftkit.select`) feed the Fisher; `score="magnitude"` needs none.
    """
    config = get_registry(model).require(name)
    if not isinstance(config, StructuredMask):
        raise SelectionError(f"adapter {name!r} is {config.method}, not structured")
    params = candidates(model, name)
    if config.score == "magnitude":
        scores = {key: p.detach().abs() for key, p in params.items()}
    elif batches is None:
        raise NoDataError(f"Fisher unit scores for adapter {name!r} need training batches (or score='magnitude')")
    else:
        scores = fisher_scores(model, name, batches, loss_fn)
    groups = config.groups(model)
    masks: dict[str, Mask] = {}
    for kind in config.units:
        of_kind = [g for g in groups if g.kind == kind]
        unit_scores = [g.unit_scores(scores) for g in of_kind]
        flat = torch.cat(unit_scores)
        chosen = flat.topk(max(1, round(config.fraction * flat.numel()))).indices.sort().values
        start = 0
        for group, group_scores in zip(of_kind, unit_scores):
            end = start + group_scores.numel()
            masks.update(group.masks(chosen[(chosen >= start) & (chosen < end)] - start, set(params)))
            start = end
    install_masks(model, name, masks)
    return masks
