"""Deltas that write learned tokens into a module's [B, N, D] sequence (VPT's prompts).

A `TokenDelta` holds P tokens [P, D] and writes them at positions at … at+P−1 of a sequence:
- inserting (`Placement.TOKENS`), on its host's output: the sequence grows by P ([CLS, patches] becomes
  [CLS, P, patches] after a vision transformer's patch embedding); the slot writes them after the host's other
  output deltas;
- replacing (`Placement.INPUT`), on its host's input: the P tokens there are overwritten (VPT-deep's fresh prompts
  at a layer's input, in place of the previous layer's outputs at those positions); the slot routes it like any
  input transform.

Un-routed, the one active adapter's tokens go into every row (two active adapters that insert tokens on one module
are an error: their positions would collide). Under `peftkit.routed`, each row gets its adapter's tokens and rows of
other adapters, or of the base, keep their sequence. Rows that insert different numbers of tokens cannot share one
tensor, and no attention mask reaches the inserted positions, so the model the adapters were attached to runs one
forward pass per insertion layout (`core.length_buckets`): each row's outputs equal running it alone, and the
buckets' outputs are merged padded at the end with zeros. Calling a submodule with such mixed rows is an error.

The model's output sequence is longer by the inserted count: a classifier reading position 0 (CLS) is unaffected;
one that pools tokens 1: (Dinov2ForImageClassification's mean of the patch tokens) pools the prompt outputs too.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import length_buckets
from .config import AdapterConfig
from .delta import Delta, Placement

if TYPE_CHECKING:
    from .registry import AdapterRegistry

Insertion = tuple[str, int, int]  # (host module, first position, tokens inserted)


class TokenError(ValueError):
    """Tokens that cannot be written into a sequence as asked (colliding adapters, rows of mixed lengths)."""


class TokenConfig(AdapterConfig):
    """Base of the methods whose deltas write tokens: attaching one lets the model's forward run one pass per
    insertion layout of a routed batch (`core.length_buckets`)."""

    def token_hosts(self, model: nn.Module) -> list[str]:
        """The modules this adapter's token deltas sit on, in model order."""
        raise NotImplementedError

    def choose_hosts(self, model: nn.Module) -> list[str]:
        hosts = self.token_hosts(model)
        length_buckets.install(model)
        return hosts


class TokenDelta(Delta):
    """P learned tokens of one adapter, inserted into its host's output or written over its input at `at`."""

    additive = False
    reads_input = False

    def __init__(self, tokens: torch.Tensor, at: int, inserts: bool):
        super().__init__()
        self.tokens = nn.Parameter(tokens)
        self.at = at
        self.placement = Placement.TOKENS if inserts else Placement.INPUT

    @property
    def opens(self) -> int:
        """Positions this delta adds to its host's sequence (0: it overwrites tokens already there)."""
        return self.tokens.shape[0] if self.placement is Placement.TOKENS else 0

    def write(self, seq: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`seq` [B, N, D] with these tokens at positions at … at+P−1 of `rows` (default: all), out of place."""
        count = self.tokens.shape[0]
        if seq.dim() != 3 or seq.shape[1] < self.at + count:
            raise TokenError(f"{count} tokens go at positions {self.at}…{self.at + count - 1} of a [batch, tokens, "
                             f"width] sequence, but the module's sequence has shape {tuple(seq.shape)}")
        tokens = self.tokens.to(seq.dtype)
        if rows is None:
            return torch.cat([seq[:, :self.at], tokens.expand(seq.shape[0], -1, -1), seq[:, self.at + count:]], 1)
        positions = torch.arange(self.at, self.at + count, device=seq.device)
        return seq.index_put((rows[:, None], positions), tokens.expand(len(rows), -1, -1))

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.write(x)

    def merge_refusal(self, host: nn.Module) -> str | None:
        return "its tokens are extra inputs to the layers, not a weight"


def insert_tokens(deltas: Mapping[str, Delta], registry: AdapterRegistry, out: torch.Tensor, where: str) -> torch.Tensor:
    """The host's output `out` with the tokens of the inserting deltas that apply (each row its own adapter's under
    routing): the sequence opens their positions once for all rows, then each adapter writes its rows."""
    inserting = {name: d for name, d in deltas.items() if d.placement is Placement.TOKENS}
    plan = registry.plan
    if plan is None:
        active = [name for name in registry.active if name in inserting]
        if len(active) > 1:
            raise TokenError(f"adapters {active} both insert tokens at module '{where}'; activate one of them, or "
                             "route rows to each")
        groups: list[tuple[TokenDelta, torch.Tensor | None]] = [(inserting[active[0]], None)] if active else []
    else:
        plan = plan.for_rows(out.shape[0], f"module '{where}'")
        groups = [(inserting[n], torch.tensor(plan.groups[n], device=out.device)) for n in plan.names if n in inserting]
        others = plan.batch_size - sum(len(rows) for _, rows in groups)
        layouts = {(d.at, d.opens) for d, _ in groups} | ({(groups[0][0].at, 0)} if others and groups else set())
        if len(layouts) > 1:
            raise TokenError(f"rows of one pass insert different tokens at module '{where}' ((position, count): "
                             f"{sorted(layouts)}); call the model the adapters were attached to, which runs one pass "
                             "per insertion layout")
    if not groups:
        return out
    first = groups[0][0]
    seq = torch.cat([out[:, :first.at], out.new_zeros(out.shape[0], first.opens, out.shape[2]), out[:, first.at:]], 1)
    for delta, rows in groups:
        seq = delta.write(seq, rows)
    return seq


def token_adapters(registry: AdapterRegistry) -> list[str]:
    """The attached adapters whose deltas write tokens."""
    return [name for name, config in registry.configs.items() if isinstance(config, TokenConfig)]


def row_insertions(model: nn.Module, registry: AdapterRegistry) -> list[tuple[Insertion, ...]]:
    """Each row of the routed batch's token insertions, in model order (() for a row that inserts none)."""
    from .slot import delta_of  # the slot module imports this one

    plan = registry.plan
    layouts: dict[str, tuple[Insertion, ...]] = {}
    for name in token_adapters(registry):
        if name in plan.groups:
            deltas = ((host, delta_of(model.get_submodule(host), name)) for host in registry.hosts[name])
            layouts[name] = tuple((host, d.at, d.opens) for host, d in deltas if isinstance(d, TokenDelta) and d.opens)
    return [layouts.get(name, ()) for name in plan.row_adapters]
