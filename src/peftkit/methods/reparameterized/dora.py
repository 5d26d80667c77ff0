"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).

    W' = m · (W0 + s·B A) / ‖W0 + s·B A‖_c,   m ∈ R^{out} initialised to ‖W0‖_c

‖·‖_c is the norm of each output row of the weight in (out, in) layout (over in and the
kernel on Conv2d), as HF PEFT computes it. Only m, A and B train; with B = 0 at start, m/‖W0‖_c = 1
and the model is unchanged. As in the paper's §4.3 (and PEFT), the norm is treated as a constant:
no gradient flows through it. Applied to the host's output without rebuilding W', so rows routed
to DoRA mix freely with other adapters' rows in one batch:

    h = (m/n) ⊙ (W0 x) + (m/n) ⊙ s·B A x + bias,   n = ‖W0 + s·B A‖_c

Hosts: Linear (and GPT-2's Conv1D), Conv2d. Merging stores n, so unmerge can invert it.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...core.config import register_method
from ...core.hosts import LINEAR_TYPES, edited_weight, read_weight, to_host_layout
from .lora import LoRA, LoRADelta


@register_method
class DoRA(LoRA):
    """DoRA config: LoRA's fields (rank, scaling, dropout, init) for the direction; m is per output row."""

    method: ClassVar[str] = "dora"
    init: Literal["zero", "gaussian"] = Field("zero", description="zero-B with Kaiming A (default) or gaussian A")
    bias: Literal["none"] = Field("none", description="DoRA trains no biases")

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES + (nn.Conv2d,)

    def build(self, host: nn.Module) -> "DoRADelta":
        return DoRADelta(host, self)

    # --- Hugging Face PEFT interop: a LORA adapter with use_dora=True --------------------------
    peft_flags: ClassVar[tuple[str, ...]] = ("use_dora",)
    _PEFT_UNSUPPORTED: ClassVar[tuple[str, ...]] = tuple(o for o in LoRA._PEFT_UNSUPPORTED if o != "use_dora")
    peft_bias_modes: ClassVar[tuple[str, ...]] = ("none",)  # DoRA rescales the output: a bias change is not wired in
    _PEFT_MAGNITUDE: ClassVar[re.Pattern] = re.compile(r"(.*)\.lora_magnitude_vector")

    def to_peft(self) -> dict[str, Any]:
        return {**super().to_peft(), "use_dora": True}

    @staticmethod
    def peft_tensor_name(tensor_name: str, host: nn.Module) -> str:
        return "lora_magnitude_vector" if tensor_name == "magnitude" else LoRA.peft_tensor_name(tensor_name, host)

    @classmethod
    def is_peft_tensor(cls, key: str) -> bool:
        return cls._PEFT_MAGNITUDE.fullmatch(key) is not None or super().is_peft_tensor(key)

    @classmethod
    def split_peft_key(cls, key: str) -> tuple[str, str]:
        match = cls._PEFT_MAGNITUDE.fullmatch(key)
        return (match[1], "magnitude") if match else super().split_peft_key(key)


class DoRADelta(LoRADelta):
    """LoRA's A, B for the direction plus the magnitude m; transforms the host output (not additive)."""

    additive = False
    reads_base = True  # n = ‖W0 + s·BA‖_c: merged only onto the pristine base, and nothing merged under it unmerged

    def __init__(self, host: nn.Module, config: DoRA):
        super().__init__(host, config)
        self._host = (host,)  # a tuple, not an attribute torch would register: W0 belongs to the base model
        out = self.lora_B.shape[0]
        # PEFT's layout (a row per output channel on Conv2d), so files interchange as they are
        self._scale_shape = (1, out, 1, 1) if self.kind == "conv2d" else (out,)
        self.magnitude = nn.Parameter(self.weight_norm())  # m = ‖W0 + s·BA‖_c = ‖W0‖_c: a no-op start
        self.register_buffer("merged_norm", None, persistent=False)  # n while merged: unmerge cannot recompute it

    def base_weight(self) -> torch.Tensor:
        """W0 in (out, in[, kh, kw]) layout, float32."""
        host = self._host[0]
        return to_host_layout(host, read_weight(host)).float()

    def lora_weight(self) -> torch.Tensor:
        """s·BA: the update of the direction, (out, in[, kh, kw])."""
        return super().delta_weight()

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """n = ‖W0 + s·BA‖_c, one per output row; a constant to autograd (the paper's §4.3)."""
        return (self.base_weight() + self.lora_weight()).flatten(1).norm(dim=1).view(self._scale_shape)

    def _rows(self, scale: torch.Tensor) -> torch.Tensor:
        """A per-output-row factor shaped to multiply a weight: [out, 1(, 1, 1)]."""
        return scale.reshape(-1, *(1,) * (self.lora_A.dim() - 1))

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x through a weight of the host's kind, without bias."""
        if self.kind != "conv2d":
            return F.linear(x, weight)
        if self._pad is not None:
            x = F.pad(x, self._pad[0], mode=self._pad[1])
        return F.conv2d(x, weight, **self._conv_args)

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        scale = self.magnitude / self.weight_norm()  # m/n: [out] (Conv2d: [1, out, 1, 1])
        bias = read_weight(self._host[0], "bias")
        if self.training and isinstance(self.dropout, nn.Dropout):
            # as PEFT: the rescaled base term sees the dropped-out input too, so W0 x is recomputed
            x = self.dropout(x.to(self.lora_A.dtype))
            base, lora = self._apply_weight(x, self.base_weight()), self._apply_weight(x, self.lora_weight())
        elif self.kind != "conv2d":
            # h = (m/n)⊙out + (1 − m/n)⊙bias + s·(m/n)⊙BAx, with s·m/n folded into B's rows and the bias term into
            # the up-projection's addmm: one pass over the output instead of six, and two instead of about six in
            # backward (they made a MiniLM DoRA training step ~2% slower than PEFT's; now it is ~4% faster)
            shift = None if bias is None else (1 - scale) * bias
            lora = F.linear(self._down(x), self.lora_B * (scale * self.scaling)[:, None], shift)
            return torch.addcmul(lora, out.to(lora.dtype), scale).to(out.dtype)
        else:
            base = out if bias is None else out - bias.view(self._scale_shape)  # W0 x
            lora = self.increment(x)  # s·BA x
        return (out + (scale - 1) * base + scale * lora).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = W' − W0 = (m/n)·(W0 + s·BA) − W0, against the unmerged host weight."""
        weight = self.base_weight()
        return self._rows(self.magnitude / self.weight_norm()) * (weight + self.lora_weight()) - weight

    def merge_into(self, host: nn.Module) -> None:
        """W' = (m/n)·(W0 + s·BA), written directly (in float64: adding ΔW = W' − W0 would cancel digits)."""
        self.merged_norm = self.weight_norm()
        scale = self._rows(self.magnitude / self.merged_norm).double()
        weight = scale * (self.base_weight().double() + self.lora_weight().double())
        with edited_weight(host) as stored:
            stored.copy_(to_host_layout(host, weight))

    def unmerge_from(self, host: nn.Module) -> None:
        """W0 = W'·(n/m) − s·BA, with the n stored at merge time (in float64, so the base comes back to rounding)."""
        scale = self._rows(self.magnitude / self.merged_norm).double()
        weight = self.base_weight().double() / scale - self.lora_weight().double()
        with edited_weight(host) as stored:
            stored.copy_(to_host_layout(host, weight))
        self.merged_norm = None

