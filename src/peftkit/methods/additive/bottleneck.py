"""Bottleneck adapters: serial (Houlsby et al., 2019, arXiv:1902.00751; Pfeiffer et al., 2020,
arXiv:2005.00247), parallel / scaled parallel (He et al., 2022, arXiv:2110.04366) and AdaptFormer's scaled parallel
adapter beside a vision transformer's MLP (Chen et al., 2022, arXiv:2205.13535).

    serial:   h ← h + s · W_up f(W_down h)      (h: the host's output)
    parallel: h ← h + s · W_up f(W_down x)      (x: the host's input)

A small down-projection to `bottleneck` units, a non-linearity f and an up-projection, both
with biases. W_up (and its bias) start at zero, so a fresh adapter is an exact no-op. Because f
is non-linear, the adapter cannot be folded into the host weight.

Hosts: Linear and GPT-2 Conv1D whose output width is the hidden size (an attention or FFN output
projection), or a whole block of linear layers (an MLP module: it reads the block's input, its first linear layer's
width, and writes its output, its last one's). Houlsby places a serial adapter after both the attention and the FFN
output, Pfeiffer after the FFN output only; He et al.'s scaled parallel adapter (s = 4) sits beside the FFN. With
module hosts, `Bottleneck.preset("parallel")` puts it on the FFN's output projection, so its
increment lands on the FFN output but it reads the FFN's inner activation (the projection's input).
`Bottleneck.preset("adaptformer")` is AdaptFormer: parallel to the whole MLP block (`mlp` in Dinov2 and ViT), 64
units, ReLU, s = 0.1: MLP(x) + s · W_up ReLU(W_down x), x the MLP's input (the normed tokens). On DINOv2 the
layer's frozen layer scale multiplies the block's output, the adapter's term included.
In a routed batch without gradients, many adapters on one host run from stacked weights (`BottleneckBank`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ...core.bank import StackedBank
from ...core.config import AdapterConfig, register_method
from ...core.delta import Delta, DeltaBank
from ...core.routing import RoutingPlan
from ...core.targets import io_widths
from ...efficient.adapter_options import DropAndPrune

Activation = Callable[[torch.Tensor], torch.Tensor]
ACTIVATIONS: dict[str, Activation] = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}

# Sublayer output projections, by module structure (no model-name list):
# BERT/RoBERTa `attention.output.dense` and `layer.N.output.dense`, Llama/Mistral `self_attn.o_proj`
# and `mlp.down_proj`, GPT-2 `attn.c_proj` and `mlp.c_proj`, Dinov2/ViT `attention.o_proj` and `mlp.fc2`.
# `layer\.\d+\.` keeps BERT's FFN output apart from `attention.output.dense`, which also ends in "output.dense".
_ATTENTION_OUT = r"attention\.output\.dense|self_attn\.o_proj|attn\.c_proj|attention\.o_proj"
_FFN_OUT = r"layer\.\d+\.output\.dense|mlp\.down_proj|mlp\.c_proj|mlp\.fc2"
PRESETS: dict[str, dict[str, Any]] = {
    "houlsby": {"placement": "serial", "targets": rf".*\.({_ATTENTION_OUT}|{_FFN_OUT})"},
    "pfeiffer": {"placement": "serial", "targets": rf".*\.({_FFN_OUT})"},
    "parallel": {"placement": "parallel", "scale": 4.0, "targets": rf".*\.({_FFN_OUT})"},
    "adaptformer": {"placement": "parallel", "scale": 0.1, "activation": "relu", "bottleneck": 64,
                    "targets": r".*\.mlp"},
}


@register_method
class Bottleneck(DropAndPrune, AdapterConfig):
    """Bottleneck adapter config: width, non-linearity, serial or parallel placement, output scale; `preset:
    houlsby | pfeiffer | parallel | adaptformer` places it as in the papers (keys given beside it override the
    preset's)."""

    method: ClassVar[str] = "bottleneck"
    bottleneck: int = Field(64, gt=0, description="units between the down- and up-projection")
    activation: Literal["relu", "gelu", "tanh", "silu"] = Field("relu", description="the non-linearity f")
    placement: Literal["serial", "parallel"] = Field("serial", description="read the host's output (serial) or input (parallel)")
    scale: float = Field(1.0, gt=0, description="s, the factor on the adapter's output (scaled parallel: 4)")

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        """`preset: houlsby` in a config file is `Bottleneck.preset("houlsby")`: the preset's placement, scale and
        targets, under the keys given beside it. The saved config holds the expanded fields, never the preset."""
        if not isinstance(data, dict) or "preset" not in data:
            return data
        fields = {key: value for key, value in data.items() if key != "preset"}
        style = data["preset"]
        if style not in PRESETS:
            raise ValueError(f"unknown bottleneck adapter preset {style!r}; choose one of {', '.join(PRESETS)}")
        return {**PRESETS[style], **fields}

    @classmethod
    def preset(cls, style: str, **fields: Any) -> "Bottleneck":
        """A config placed as in a paper: "houlsby", "pfeiffer", "parallel" (He et al.'s scaled PA) or "adaptformer";
        `fields` override the preset's (e.g. `bottleneck=64`, `targets=...`)."""
        return cls(preset=style, **fields)

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Module,)  # a linear layer or a block of them: `io_widths` refuses any other module

    def build(self, host: nn.Module) -> "BottleneckDelta":
        return BottleneckDelta(host, self)


class BottleneckDelta(Delta):
    """One adapter on one host: serial transform(x, h) = h + s·up(f(down(h))), parallel increment(x) = s·up(f(down(x)))."""

    def __init__(self, host: nn.Module, config: Bottleneck):
        super().__init__()
        in_features, out_features = io_widths(host)
        self.additive = self.reads_input = config.placement == "parallel"  # parallel reads x; serial rewrites h
        width = in_features if self.additive else out_features  # what the down-projection reads
        if config.bottleneck > out_features:
            raise ValueError(f"bottleneck {config.bottleneck} is larger than the host's hidden size {out_features} "
                             f"(in {in_features}, out {out_features})")
        self.scale, self.act = config.scale, ACTIVATIONS[config.activation]
        # Adapter weights stay float32 on a half-precision base, as LoRA's do.
        factory = {"dtype": torch.float32, "device": next(host.parameters()).device}
        self.down = nn.Linear(width, config.bottleneck, **factory)  # default (Kaiming-uniform) init, as LoRA's A
        self.up = nn.Linear(config.bottleneck, out_features, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def _adapter(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h.to(self.down.weight.dtype)))) * self.scale

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        return self._adapter(x)

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + self._adapter(out).to(out.dtype)

    @classmethod
    def add_routed_batch_(cls, deltas: dict[str, "BottleneckDelta"], plan: RoutingPlan, x: torch.Tensor,
                          out: torch.Tensor, bank: DeltaBank | None) -> tuple[str, ...]:
        """Many adapters in one batch without gradients: per group of one placement and one f, the group's rows each
        take their adapter's weights from the group's `BottleneckBank` and two batched matmuls (`baddbmm`) compute all
        of them, added back with one `index_add_`. Only the group's rows are computed, on weights gathered once for the
        latest rows (`StackedBank.rows`): a bottleneck's weights are wide, and gathering them for every row of every
        step costs as much as the per-adapter loop it replaces. With gradients the group loop runs."""
        if torch.is_grad_enabled() or not out.is_contiguous():
            return ()
        like = next(iter(deltas.values())).down.weight
        groups: dict[tuple[bool, Activation], dict[str, BottleneckDelta]] = {}
        for name, delta in deltas.items():
            if delta.down.weight.dtype == like.dtype and delta.down.weight.device == like.device:
                groups.setdefault((delta.additive, delta.act), {})[name] = delta
        rows_out = out.view(out.shape[0], -1, out.shape[-1])
        for (parallel, act), group in groups.items():
            stacked = bank.group(parallel, act)
            rows, which = plan.routed_rows(tuple(group))
            down, down_bias, up, up_bias = stacked.rows(stacked.lookup(group)[1], which)
            rows = rows.to(out.device)
            h = (x.reshape(x.shape[0], -1, x.shape[-1]) if parallel else rows_out).index_select(0, rows).to(down.dtype)
            hidden = act(torch.baddbmm(down_bias.unsqueeze(1), h, down.transpose(1, 2)))  # [rows, T, M]
            increment = torch.baddbmm(up_bias.unsqueeze(1), hidden, up)  # s·(W_up f(…) + b_up): [rows, T, out]
            rows_out.index_add_(0, rows, increment.to(out.dtype))
        return tuple(name for group in groups.values() for name in group)

    @classmethod
    def new_bank(cls) -> "BottleneckBanks":
        return BottleneckBanks()


class BottleneckBank(StackedBank):
    """The adapters of one placement and one f on one host (`core.bank`): W_down [1 + n, M, in] and b_down [1 + n, M],
    (s·W_up)ᵀ [1 + n, M, out] and s·b_up [1 + n, out], every width zero-padded to the largest, M. Exact: a padded unit
    reads zero weights and a zero bias, and whatever f(0) is, it meets a zero row of (s·W_up)ᵀ."""

    padded_dims = (0, 0, 0, None)

    @staticmethod
    def entry(delta: BottleneckDelta) -> tuple[torch.Tensor, ...]:
        down, up = delta.down, delta.up
        return down.weight, down.bias, up.weight.t() * delta.scale, up.bias * delta.scale

    @staticmethod
    def sources(delta: BottleneckDelta) -> tuple[torch.Tensor, ...]:
        return delta.down.weight, delta.down.bias, delta.up.weight, delta.up.bias

    @staticmethod
    def settings(delta: BottleneckDelta) -> tuple[float]:
        return (delta.scale,)


class BottleneckBanks(DeltaBank):
    """A host's bottleneck banks, one per group of adapters that read the same input (placement) through the same f."""

    def __init__(self) -> None:
        self.groups: dict[tuple[bool, Activation], BottleneckBank] = {}

    def group(self, parallel: bool, act: Activation) -> BottleneckBank:
        bank = self.groups.get((parallel, act))
        if bank is None:
            bank = self.groups[(parallel, act)] = BottleneckBank()
        return bank

    def discard(self, name: str) -> None:
        for bank in self.groups.values():
            bank.discard(name)
