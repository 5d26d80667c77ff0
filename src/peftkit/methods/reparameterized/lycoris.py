"""What LoHa and LoKr share (both LyCORIS weight deltas, as in HF PEFT's `LycorisConfig` / `LycorisLayer`).

    h = W0 x + drop_rank ⊙ (s · ΔW x),   s = alpha/r,   ΔW from the method's factors (`factor_weight`)

The fields PEFT gives both (r, alpha, rank_dropout, module_dropout, use_effective_conv2d), their PEFT
translation (same field and tensor names as PEFT's; per-module `rank_pattern` / `alpha_pattern` refused),
the hosts (Linear, GPT-2 Conv1D, Conv2d with groups = 1; PEFT has no GPT-2 Conv1D layer for either method, so
such an adapter saves only in peftkit format), and the training-only dropouts as PEFT applies them:
module_dropout skips the whole delta for a pass with probability p; rank_dropout zeroes each output row of
ΔW with probability p (PEFT: `rand(out) > p`), LoHa rescaling the kept rows by 1/mean, LoKr only with
`rank_dropout_scale`. Both are off in eval, so merge and PEFT interop see the plain formula.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.hf_peft import PeftKeys
from ...core.hosts import LINEAR_TYPES, Conv1D, host_shape


class LycorisConfig(PeftKeys, AdapterConfig):
    """Fields of every LyCORIS method (not registered itself)."""

    r: int = Field(8, gt=0, description="rank of each low-rank factor")
    alpha: float = Field(8.0, gt=0, description="scaling numerator: s = alpha/r")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="training: drop each output row of ΔW with this p")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="training: skip the whole delta with this p")
    use_effective_conv2d: bool = Field(False, description="Conv2d (kernel > 1x1): CP-decomposed kernel factors")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES + (nn.Conv2d,)

    # --- Hugging Face PEFT interop (field names are PEFT's) -------------------------------------------------------
    _PEFT_TENSOR_PREFIX: ClassVar[str] = ""
    _PEFT_UNSUPPORTED: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")  # per-module r / alpha
    _PEFT_FIELDS: ClassVar[tuple[str, ...]] = ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d")

    def to_peft(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type, **{f: getattr(self, f) for f in self._PEFT_FIELDS},
            "target_modules": self.targets, "exclude_modules": self.exclude, "init_weights": True,
            "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": self.modules_to_save or None,
            "task_type": None, "inference_mode": True,
        }

    @classmethod
    def from_peft(cls, peft: dict[str, Any], modules_to_save: list[str]) -> "LycorisConfig":
        cls.check_peft_options(peft)  # init_weights only chooses the start, which the file's tensors replace
        return cls(**{f: peft[f] for f in cls._PEFT_FIELDS if f in peft}, targets=peft["target_modules"],
                   exclude=peft.get("exclude_modules"), modules_to_save=modules_to_save)

    @classmethod
    def peft_tensor_name(cls, tensor_name: str, host: nn.Module) -> str:
        if Conv1D is not None and isinstance(host, Conv1D):
            raise ValueError(f"Hugging Face PEFT's {cls.peft_type} has no layer for GPT-2's Conv1D; "
                             "save this adapter in peftkit format")
        return tensor_name


class LycorisDelta(Delta):
    """increment(x) = s · ΔW x, ΔW = `factor_weight()` reshaped to the host's (out, in[, kh, kw]).

    Subclasses create their factors, implement `factor_weight`, and may override `_product` (ΔW x without s) to
    avoid building ΔW (LoHa's and LoKr's Linear paths)."""

    def __init__(self, host: nn.Module, config: LycorisConfig, rank_dropout_scale: bool):
        super().__init__()
        shape = host_shape(host)
        self.kind, self.scaling = shape.kind, config.scaling
        self.out_features, self.in_features, self.kernel = shape.out_features, shape.in_features, shape.kernel_size
        self.effective_conv = config.use_effective_conv2d and self.kind == "conv2d" and self.kernel != (1, 1)
        self.rank_dropout, self.module_dropout, self.rank_dropout_scale = (
            config.rank_dropout, config.module_dropout, rank_dropout_scale)
        # Adapter weights stay float32 on a half-precision base, as LoRA's (and PEFT's) do.
        self._factory = {"dtype": torch.float32, "device": host.weight.device}
        if self.kind == "conv2d":
            self._conv_args = {k: getattr(host, k) for k in ("stride", "padding", "dilation")}
            # non-zero padding modes pad explicitly (as Conv2d does), so the delta matches the merged weight
            self._pad = None if host.padding_mode == "zeros" else (host._reversed_padding_repeated_twice, host.padding_mode)
            if self._pad is not None:
                self._conv_args["padding"] = 0

    def factor_weight(self) -> torch.Tensor:
        """ΔW / s from the factors, in any shape that reshapes to (out, in[, kh, kw])."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        return self.factor_weight().float().reshape(self.out_features, self.in_features, *self.kernel) * self.scaling

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x / s for input rows x (float32); by default through ΔW (PEFT's way)."""
        weight = self.factor_weight().reshape(self.out_features, self.in_features, *self.kernel)
        if self.kind != "conv2d":
            return F.linear(x, weight)
        if self._pad is not None:
            x = F.pad(x, self._pad[0], mode=self._pad[1])
        return F.conv2d(x, weight, **self._conv_args)

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scaling
        if self.training and self.module_dropout and float(torch.rand(1)) <= self.module_dropout:
            scale = 0.0  # PEFT skips the delta this pass (kept in the graph, so routed batches keep their shapes)
        out = self._product(x.to(torch.float32)) * scale
        if self.training and self.rank_dropout:
            drop = (torch.rand(self.out_features) > self.rank_dropout).to(out)
            if self.rank_dropout_scale:
                drop = drop / drop.mean().clamp_min(1e-12)  # PEFT divides by the mean (all dropped: stays 0)
            out = out * (drop.view(-1, 1, 1) if self.kind == "conv2d" else drop)
        return out
