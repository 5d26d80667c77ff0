"""The one protocol every method's layer follows: a named delta sitting on a host module.

Where a delta acts is its `placement` (one value, `Placement`):
- OUTPUT: on the host's output, either *additive* (an increment added to it, e.g. LoRA's s·BAx) or
  *transforming* (a new output from the input and the base output, e.g. DoRA's rescaling, or a trainable
  copy of a classification head that ignores the base);
- INPUT: the host runs on t(x) ((IA)³'s feed-forward vector s ⊙ x, OFT's blockwise rotation x·R);
- HOST_CALL: folded into the host's own call where a pass allows it (a selective change of a Linear's
  weight: one matmul on W0 + ΔW), on the output otherwise;
- SEQUENCE: extra positions of the model's input (virtual tokens, KV prefixes: `core.sequence`);
- TOKENS: positions inserted into the host's output sequence [B, N, D] (VPT's prompts: `core.tokens`).
The host slot (`core.slot`) applies each for the rows routed to the delta and never needs to know which
method it is running.
"""
from __future__ import annotations

import copy
import enum
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .hosts import edited_weight, refusal_to_train, to_host_layout

if TYPE_CHECKING:
    from ..efficient.adapter_drop import LayerDrop
    from .routing import RoutingPlan


class Placement(enum.Enum):
    """Where a delta acts on its host (see the module docstring)."""

    OUTPUT = "output"  # the slot's output hook: `increment` or `transform` of the host's output
    INPUT = "input"  # the slot's pre-hook: the host runs on `transform_input(x)`
    HOST_CALL = "host call"  # `host_call` replaces the host's own call where it can; OUTPUT where it cannot
    SEQUENCE = "sequence"  # core.sequence, at the model's input: the slot never applies it
    TOKENS = "tokens"  # core.tokens: positions inserted into the host's output sequence, after the output deltas


class Delta(nn.Module):
    """Base class of a method's layer. Subclasses implement `increment` or, if not additive, `transform`."""

    placement: Placement = Placement.OUTPUT
    additive: bool = True  # OUTPUT / HOST_CALL: `increment` added to the output, else `transform` of it
    merged: bool = False
    rewrites_base: bool = False  # True when attaching changed the host weight (PiSSA's residual)
    reads_input: bool = True  # False: transform ignores `x` (gets None under routing, which then skips gathering it)
    reads_base: bool = False  # the unmerged forward reads the host's weight itself (DoRA's norm): see core.merging
    merge_snapshot: dict[str, torch.Tensor] | None = None  # the delta's tensors when merged, for an exact unmerge
    host_state_before_merge: object | None = None  # a quantized host's stored weight before the merge (core.merging)
    trains_host_parameters: bool = False  # trains (a copy of) the host's own parameters: refused on a quantized host
    layer_drop: "LayerDrop | None" = None  # AdapterDrop (efficient.adapter_drop): whether this layer's delta is skipped

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        """The additive contribution to the host output for input rows `x`."""
        raise NotImplementedError

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The new output for input rows `x` whose base output is `out` (non-additive deltas only)."""
        raise NotImplementedError

    def input_scale(self) -> torch.Tensor:
        """s over the host's input features (INPUT deltas that keep the default `transform_input`)."""
        raise NotImplementedError

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The host's input for rows `x` (INPUT deltas); by default the scaling s ⊙ x.

        A delta that keeps this default is a pure scale, which the slot applies with one gather for a routed batch."""
        scale = self.input_scale()
        return (x.to(scale.dtype) * scale).to(x.dtype)

    def host_call(self, host: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The host's output for `x` with this delta folded into the host's own computation (HOST_CALL deltas),
        or None when this call cannot fold: the delta then acts on the host's output as usual."""
        return None

    @property
    def adds_term(self) -> bool:
        """Whether this delta adds a term f(x) to the host's output that reads neither that output nor the base
        weight: such deltas commute with each other, so any of them may be merged while others run unmerged."""
        return self.additive and not self.reads_base

    def commutes_with(self, other: "Delta") -> bool:
        """Whether this delta and `other`, on one host, give the same output in either order (core.merging)."""
        return self.adds_term and other.adds_term

    def merge_refusal(self, host: nn.Module) -> str | None:
        """Why this delta cannot be folded into `host`'s weights now, or None (checked before anything changes)."""
        if type(self).merge_into is Delta.merge_into and type(self).delta_weight is Delta.delta_weight:
            return f"{type(self).__name__} has no weight delta to fold into the base weights"
        if self.layer_drop is not None and self.layer_drop.drops(training=False):
            return "AdapterDrop skips this layer's delta at inference; folded into the weight it would act again"
        return None

    @property
    def acts_on_output(self) -> bool:
        """Whether the slot's output hook applies this delta (not one applied before the host or at the model input)."""
        return (not self.merged and self.placement in (Placement.OUTPUT, Placement.HOST_CALL)
                and (self.layer_drop is None or not self.layer_drop.drops(self.training)))

    @staticmethod
    def read_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The tensor `x` this delta reads from its host's call: by default the host's first input, however passed.

        A delta that needs more of the call (LLaMA-Adapter: the rotary position embeddings) packs it into
        one tensor whose dim 0 is the batch, so per-row routing can slice it like any input.
        """
        return args[0] if args else next(iter(kwargs.values()))

    def add_increment_(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out += increment(x)` in place (additive deltas); a method may fuse this into one kernel."""
        return out.add_(self.increment(x))

    @classmethod
    def add_routed_batch_(cls, deltas: dict[str, "Delta"], plan: "RoutingPlan", x: torch.Tensor, out: torch.Tensor,
                          bank: "DeltaBank | None") -> tuple[str, ...]:
        """Optional: apply many deltas of this type on one host to a routed batch at once, in place on `out` (a row
        whose adapter is not among `deltas` gets nothing). Return the names applied; the slot applies the others
        group by group. `bank`: what `new_bank` made for this type on this host, kept across forward passes."""
        return ()

    @classmethod
    def new_bank(cls) -> "DeltaBank | None":
        """Optional: per-host state for `add_routed_batch_` (`core.bank`'s stacks), made on its first use."""
        return None

    @classmethod
    def link_adapter(cls, deltas: dict[str, "Delta"]) -> None:
        """Optional: connect one adapter's deltas of this type (by host name) once all of them are placed."""

    def delta_weight(self) -> torch.Tensor:
        """ΔW in (out, in[, k...]) layout; methods that cannot merge leave this unimplemented."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors written to an adapter file (a method may save an equivalent plain form)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def prepare_load(self, saved: dict[str, torch.Tensor]) -> None:
        """Fit this delta to its tensors in an adapter file before they are checked and copied.

        Only a delta whose shapes change in training overrides it (SoRA saves a pruned rank).
        """

    def restore_base(self, host: nn.Module) -> None:
        """Undo what attaching did to the host weight (only for `rewrites_base` deltas)."""

    def merge_into(self, host: nn.Module) -> None:
        """Add ΔW to the host weight. One formula (`delta_weight`) serves merge and unmerge."""
        with edited_weight(host) as weight:
            weight += to_host_layout(host, self.delta_weight().to(torch.float32)).to(weight.dtype)

    def unmerge_from(self, host: nn.Module) -> None:
        with edited_weight(host) as weight:
            weight -= to_host_layout(host, self.delta_weight().to(torch.float32)).to(weight.dtype)


class DeltaBank:
    """State a delta type keeps on one host across routed forward passes (`Delta.new_bank`); the slot tells it when
    an adapter's delta leaves the host."""

    def discard(self, name: str) -> None:
        """Forget adapter `name`."""


class ModuleCopy(Delta):
    """A trainable per-adapter copy of a whole module (a task head): h = copy(x).

    Merging swaps the copy's tensors into the host (and back), so unmerge is exact.
    """

    additive = False
    trains_host_parameters = True

    def __init__(self, host: nn.Module):
        super().__init__()
        refusal = refusal_to_train(host)  # before copying: a packed weight cannot even be made trainable
        if refusal is not None:
            raise ValueError(refusal)
        self.module = copy.deepcopy(host)
        _strip_peft_state(self.module)
        for p in self.module.parameters():
            p.requires_grad_(True)

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def merge_into(self, host: nn.Module) -> None:
        self._swap(host)

    def unmerge_from(self, host: nn.Module) -> None:
        self._swap(host)

    def _swap(self, host: nn.Module) -> None:
        own = dict(self.module.named_parameters())
        for name, param in host.named_parameters():
            if name in own:
                tmp = param.data
                param.data = own[name].data
                own[name].data = tmp


def _strip_peft_state(module: nn.Module) -> None:
    """Remove any delta slots a deep copy carried over from the original module."""
    from .slot import deltas_of, detach_slot

    for sub in list(module.modules()):
        if deltas_of(sub):
            detach_slot(sub)
