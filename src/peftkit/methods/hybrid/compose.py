"""Hybrid adapters: several methods' deltas under one adapter name (docs/hybrid.md).

    h ← h + Σ_i g_i · Δ_i(x)          (parts that add a term; g_i = 1 ungated)
    h ← h + g_i · (T_i(x, h) − h)     (a part that rewrites the output, in part order)
    g_i = σ(w_iᵀ u + b_i)             (a learned gate, per position, on the part's own input u)

`Compose(LoRA(...), PrefixTuning(...), Bottleneck(...), gates="learned")` attaches every part under the adapter's
one name: each host module gets one `ComposedDelta` holding the parts that target it (saved as
`<module>.parts.<i>.<tensor>`, gates as `<module>.gates.<i>.*`), and a prefix or prompt part sits on the model as a
`SequencePart`. Activation, routing, save, load and removal then work on the one name like any adapter's.

A gate reads what its part reads: the host's input for an increment (LoRA, a parallel adapter), the host's output for
a part that rewrites it (a serial adapter). A prefix's gate (UniPELT's G_P) scales each layer's prefix keys and values
by σ(W_P ē + b) ∈ (0, 1)^{layers × 2}, ē the mean of the row's input embeddings over its real tokens: the prefix
cache is written once before the layers run, so it reads the input the model is called with rather than each layer's
(UniPELT reads the layer's input). Gates start at w = 0, b = 0: every gate is 1/2 until trained.

Merging folds each part into the host weight in turn; it is refused, naming the part, for a gated part (its weight
change depends on the input), a part that cannot merge (a bottleneck adapter, virtual tokens), or several parts on one
module that do not all just add a term.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr, field_serializer, field_validator
from torch import nn

from ...core.config import AdapterConfig, config_from_dict, register_method
from ...core.delta import Delta, Placement
from ...core.hosts import host_shape
from ...core.sequence import ROOT, SequenceConfig, SequenceDelta, SequenceError, input_embeddings, kv_geometry
from ...core.targets import layer_number, module_names
from ...core.tokens import TokenConfig
from ...efficient.adapter_options import DropAndPrune

# A part's config hooks that leave nothing to run around training (DropAndPrune's steps are empty while unset).
_NO_STEPS = {AdapterConfig.training_steps, DropAndPrune.training_steps, AdapterConfig.fill_from_run,
             AdapterConfig.optimizer_groups}


@dataclass(frozen=True)
class Placed:
    """One part of a hybrid: its config, whether a learned gate scales it, and the layers it is limited to."""

    config: AdapterConfig
    gated: bool
    layers: frozenset[int] | None = None  # None: wherever the part's own targets reach


def parse_parts(value: Any) -> Any:
    """Parts given as configs or as their `to_dict` form (a JSON file, a YAML train config)."""
    if not isinstance(value, (list, tuple)):
        return value
    return [config_from_dict(part) if isinstance(part, dict) else part for part in value]


def check_parts(parts: list[AdapterConfig], where: str = "parts") -> list[AdapterConfig]:
    """A part is a plain method's config that needs nothing around training and trains no head of its own."""
    for i, part in enumerate(parts):
        label = f"{where}[{i}] ({part.method})"
        if isinstance(part, HybridConfig):
            raise ValueError(f"{label} is itself a hybrid; list its parts here instead")
        if part.modules_to_save:
            raise ValueError(f"{label} has modules_to_save {part.modules_to_save}; give them to the hybrid itself, "
                             "which trains them once for all its parts")
        if isinstance(part, TokenConfig):
            raise ValueError(f"{label} inserts tokens into the sequence, which changes its length for every other part; "
                             "attach it as its own adapter")
        if part.rewrites_base:
            raise ValueError(f"{label} rewrites the base weights (PiSSA / LoftQ init); a part must leave them as they are")
        if isinstance(part, DropAndPrune) and (part.adapter_drop is not None or part.prune is not None):
            raise ValueError(f"{label} sets adapter_drop or prune, which a hybrid does not apply per part; use the "
                             "plain method as its own adapter")
        needs = [hook for hook in ("training_steps", "fill_from_run", "optimizer_groups")
                 if getattr(type(part), hook) not in _NO_STEPS] + (["trains_base"] if part.trains_base else [])
        if needs:
            raise ValueError(f"{label} needs its own training steps ({', '.join(needs)}), which a hybrid does not run "
                             "per part; use the plain method as its own adapter")
    return parts


class HybridConfig(AdapterConfig):
    """The machinery every hybrid shares: the parts' hosts, one delta per host, the saved form. A subclass says
    which parts it places (`placed_parts`)."""

    targets: Literal["parts"] = Field("parts", description="each part names its own targets")
    exclude: None = Field(None, description="none: each part names its own exclude")
    gates: Literal["none", "learned"] = Field("none", description="'learned': a gate σ(wᵀu + b) scales every part")
    _layout: tuple[list[Placed], list[list[str]]] | None = PrivateAttr(None)  # set by choose_hosts, read by build_all

    def placed_parts(self, model: nn.Module) -> list[Placed]:
        raise NotImplementedError

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Module,)

    def choose_hosts(self, model: nn.Module) -> list[str]:
        """Every module some part goes on (the model itself first for a prefix or prompt part), in model order."""
        placed = self.placed_parts(model)
        if sum(isinstance(p.config, SequenceConfig) for p in placed) > 1:
            raise ValueError("a hybrid holds at most one prefix or prompt part: rows get one set of virtual tokens")
        per_part = [_part_hosts(model, i, p) for i, p in enumerate(placed)]
        self._layout = (placed, per_part)
        chosen = {name for names in per_part for name in names}
        return [ROOT] * (ROOT in chosen) + [name for name in module_names(model) if name in chosen]

    def build_all(self, hosts: dict[str, nn.Module]) -> Iterator[Delta]:
        """Every part's deltas first (a part may share state across its hosts), then one holder per host."""
        if self._layout is None:
            raise RuntimeError("choose_hosts(model) must run before build_all")
        (placed, per_part), self._layout = self._layout, None  # kept no longer: configs compare with their private state
        by_host: dict[str, dict[int, Delta]] = {name: {} for name in hosts}
        for i, (part, names) in enumerate(zip(placed, per_part)):
            built = part.config.build_all({name: hosts[name] for name in names})
            for name in names:
                try:
                    by_host[name][i] = next(built)
                except ValueError as err:
                    raise ValueError(f"part {i} ({part.config.method}) on module {name!r}: {err}") from err
        for name, host in hosts.items():
            parts = by_host[name]
            gated = {i for i in parts if placed[i].gated}
            labels = {i: placed[i].config.method for i in parts}
            if name == ROOT:
                (i, delta), = parts.items()
                yield SequencePart(host, i, delta, placed[i].config, i in gated, labels[i])
            else:
                yield ComposedDelta(host, parts, gated, labels)


def _part_hosts(model: nn.Module, index: int, placed: Placed) -> list[str]:
    """The modules one part goes on: its own targets, limited to its layers."""
    label = f"part {index} ({placed.config.method})"
    hosts = placed.config.choose_hosts(model)
    if placed.layers is None:
        return hosts
    if hosts == [ROOT]:
        raise ValueError(f"{label} adds virtual tokens to every layer at once and cannot be limited to layers "
                         f"{sorted(placed.layers)}; make it a part of the whole model")
    outside = [name for name in hosts if layer_number(name) is None]
    if outside:
        raise ValueError(f"{label} targets {outside[:3]}, which sit in no numbered layer, so no layer group holds "
                         "them; narrow its targets or make it a part of the whole model")
    kept = [name for name in hosts if layer_number(name) in placed.layers]
    if not kept:
        raise ValueError(f"{label}: none of its targets lies in layers {sorted(placed.layers)}")
    return kept


def _gate(width: int, like: nn.Module, outputs: int = 1) -> nn.Linear:
    """σ(wᵀu + b) with w = 0, b = 0: 1/2 until trained. Float32 beside the host, as the parts' weights."""
    device = next(like.parameters()).device
    gate = nn.Linear(width, outputs, dtype=torch.float32, device=device)
    nn.init.zeros_(gate.weight)
    nn.init.zeros_(gate.bias)
    return gate


def _gate_width(host: nn.Module, part: Delta, label: str) -> int:
    """The width of what a part reads: the host's input, or its output for a part that rewrites it."""
    try:
        shape = host_shape(host)
    except TypeError as err:
        raise ValueError(f"{label}: a learned gate needs a Linear host: {err}") from None
    if shape.kind not in ("linear", "conv1d"):  # a Conv2d's last axis is the image width; an Embedding reads ids
        raise ValueError(f"{label}: a learned gate reads features on the last axis, as a Linear's input has them; "
                         f"this {type(host).__name__} ({shape.kind} host) has none there: target Linear layers with "
                         "this part, or use gates='none'")
    return shape.in_features if part.placement is Placement.INPUT or part.additive else shape.out_features


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{key}": value for key, value in tensors.items()}


class ComposedDelta(Delta):
    """The parts of one hybrid adapter on one host module, applied in part order, each scaled by its gate."""

    def __init__(self, host: nn.Module, parts: dict[int, Delta], gated: set[int], labels: dict[int, str]):
        super().__init__()
        self.labels = {str(i): f"part {i} ({label})" for i, label in labels.items()}
        odd = [self.labels[str(i)] for i, d in parts.items() if type(d).read_input is not Delta.read_input]
        if odd:
            raise ValueError(f"{odd[0]} reads more of the module's call than its input, which a hybrid cannot share")
        on_input = {i for i, d in parts.items() if d.placement is Placement.INPUT}
        if on_input and len(on_input) < len(parts):
            names = ", ".join(self.labels[str(i)] for i in sorted(parts))
            raise ValueError(f"{names} sit on one module, some transforming its input and some its output; "
                             "give them different targets")
        self.placement = Placement.INPUT if on_input else Placement.OUTPUT
        self.parts = nn.ModuleDict({str(i): delta for i, delta in parts.items()})
        self.gates = nn.ModuleDict({str(i): _gate(_gate_width(host, d, self.labels[str(i)]), host)
                                    for i, d in parts.items() if i in gated})
        self.additive = all(d.additive for d in parts.values())
        self.reads_input = bool(self.gates) or any(d.reads_input for d in parts.values())
        self.reads_base = any(d.reads_base for d in parts.values())
        self.trains_host_parameters = any(d.trains_host_parameters for d in parts.values())

    @property
    def adds_term(self) -> bool:
        """Every part adds a term that reads only x (LoRA's, a selective change's), and no part that rewrites the
        output is gated (its gate reads the output): then the holder commutes with other such deltas (core.merging)."""
        return all(part.adds_term and (part.additive or key not in self.gates) for key, part in self.parts.items())

    def _scale(self, key: str, u: torch.Tensor) -> torch.Tensor | None:
        gate = self.gates[key] if key in self.gates else None
        return None if gate is None else torch.sigmoid(gate(u.to(gate.weight.dtype)))

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for key, part in self.parts.items():
            term = part.increment(x)
            g = self._scale(key, x)
            term = term if g is None else (g * term).to(term.dtype)
            total = term if total is None else total + term
        return total

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for key, part in self.parts.items():
            if part.additive:
                term, g = part.increment(x), self._scale(key, x)
                out = out + (term if g is None else g * term).to(out.dtype)
            else:
                new, g = part.transform(x, out), self._scale(key, out)
                out = new if g is None else (out + g * (new - out)).to(out.dtype)
        return out

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        for key, part in self.parts.items():
            t = part.transform_input(x)
            g = self._scale(key, x)
            x = t if g is None else (x + g * (t - x)).to(x.dtype)
        return x

    def merge_refusal(self, host: nn.Module) -> str | None:
        for key, part in self.parts.items():
            if key in self.gates:
                return (f"{self.labels[key]} is scaled by a learned gate σ(wᵀu + b) that depends on the input, so its "
                        "change is no fixed weight")
            refusal = part.merge_refusal(host)
            if refusal is not None:
                return f"{self.labels[key]}: {refusal}"
        if len(self.parts) > 1 and not all(part.adds_term for part in self.parts.values()):
            return (f"{', '.join(self.labels.values())} share this module and do not all just add a term, so folding "
                    "them one after another would not give their forward")
        return None

    def delta_weight(self) -> torch.Tensor:
        if self.gates:
            raise NotImplementedError("a gated part has no fixed weight delta")
        return sum(part.delta_weight() for part in self.parts.values())

    def merge_into(self, host: nn.Module) -> None:
        for part in self.parts.values():
            part.merge_into(host)

    def unmerge_from(self, host: nn.Module) -> None:
        for part in reversed(list(self.parts.values())):
            part.unmerge_from(host)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for key, part in self.parts.items():
            tensors.update(_prefixed(f"parts.{key}.", part.saved_tensors()))
        return {**tensors, **_prefixed("gates.", {k: v.detach() for k, v in self.gates.state_dict().items()})}

    def prepare_load(self, saved: dict[str, torch.Tensor]) -> None:
        """Each part fits itself to its own tensors (their keys without the part's prefix)."""
        for key, part in self.parts.items():
            prefix = f"parts.{key}."
            own = {k[len(prefix):]: saved.pop(k) for k in [k for k in saved if k.startswith(prefix)]}
            part.prepare_load(own)
            saved.update(_prefixed(prefix, own))

    @classmethod
    def link_adapter(cls, deltas: dict[str, "ComposedDelta"]) -> None:
        """Each part's deltas of one type are linked as that method links one adapter's (LoRA's shared q/k/v input)."""
        by_part: dict[tuple[str, type[Delta]], dict[str, Delta]] = {}
        for host_name, delta in deltas.items():
            for key, part in delta.parts.items():
                by_part.setdefault((key, type(part)), {})[host_name] = part
        for (_, kind), group in by_part.items():
            kind.link_adapter(group)


class SequencePart(SequenceDelta):
    """A hybrid's prefix or prompt part on the model; gated, a prefix whose layers' keys and values are scaled per row
    by σ(W_P ē + b) (`row_virtual`)."""

    def __init__(self, model: nn.Module, index: int, part: SequenceDelta, config: SequenceConfig, gated: bool,
                 label: str):
        super().__init__(model, config)
        self.kind = part.kind
        self.label = f"part {index} ({label})"
        self.parts = nn.ModuleDict({str(index): part})
        self.gates = nn.ModuleDict()
        if gated:
            if part.kind != "prefix":
                raise ValueError(f"{self.label}: a learned gate scales prefix keys and values; a prompt has none")
            self.layers = kv_geometry(model)[0]
            self.gates[str(index)] = _gate(input_embeddings(model).embedding_dim, part, 2 * self.layers)
            self.reads_rows = True

    @property
    def part(self) -> SequenceDelta:
        return next(iter(self.parts.values()))

    def virtual(self) -> torch.Tensor:
        if self.reads_rows:
            raise SequenceError(f"{self.label} is gated by each row's input, so it has no prefix of its own; run it "
                                "through the model (per-row routing works), not a prefix cache filled beforehand")
        return self.part.virtual()

    def row_virtual(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gate = next(iter(self.gates.values()))
        real = mask.to(gate.weight.dtype)[..., None]
        mean = (embeds.to(gate.weight.dtype) * real).sum(1) / real.sum(1).clamp(min=1)  # ē over the real tokens
        g = torch.sigmoid(gate(mean)).view(-1, 1, self.layers, 2, 1, 1)  # [rows, 1, layers, key|value, 1, 1]
        prefix = self.part.virtual()
        return prefix[None] * g.to(prefix.dtype)

    def merge_refusal(self, host: nn.Module) -> str | None:
        return f"{self.label}: {self.part.merge_refusal(host)}"

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        key = next(iter(self.parts))
        gates = {k: v.detach() for k, v in self.gates.state_dict().items()}
        return {**_prefixed(f"parts.{key}.", self.part.saved_tensors()), **_prefixed("gates.", gates)}


@register_method
class Compose(HybridConfig):
    """Several methods under one adapter name, each part with its own targets and settings; gates optional.

    `Compose(LoRA(...), PrefixTuning(...), Bottleneck(...), gates="learned")`."""

    method: ClassVar[str] = "compose"
    parts: list[AdapterConfig] = Field(description="the methods' configs, applied in this order on a shared module")

    def __init__(self, *parts: AdapterConfig, **fields: Any):
        if parts:
            if "parts" in fields:
                raise TypeError("give the parts either as arguments or as parts=[...], not both")
            fields["parts"] = list(parts)
        super().__init__(**fields)

    @field_validator("parts", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        return parse_parts(value)

    @field_validator("parts")
    @classmethod
    def _check(cls, value: list[AdapterConfig]) -> list[AdapterConfig]:
        if not value:
            raise ValueError("a composition needs at least one part")
        return check_parts(value)

    @field_serializer("parts")
    def _dump(self, parts: list[AdapterConfig]) -> list[dict[str, Any]]:
        return [part.to_dict() for part in parts]

    def placed_parts(self, model: nn.Module) -> list[Placed]:
        return [Placed(part, self.gates == "learned") for part in self.parts]

    def saved_config(self) -> "Compose":
        """Each part in its saved form (a prefix without its training MLP)."""
        return self.model_copy(update={"parts": [part.saved_config() for part in self.parts]})
