"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

    h = W0 x + s · B A x,   A ∈ R^{r×in}, B ∈ R^{out×r},   s = α/r  (rsLoRA: s = α/√r)

W0 stays frozen; only A and B train. With B = 0 at start the model is unchanged, and
ΔW = s·BA merges into W0 for zero-overhead inference. PiSSA (Meng et al., 2024) starts
A, B from the top-r singular triplets of W0 and leaves the residual in the base weight.

Hosts: Linear (and GPT-2's Conv1D), Conv2d (A is a conv with W0's kernel, B a 1×1 conv),
Embedding (A is looked up by token id).
"""
from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...core.config import AdapterConfig, register_method
from ...core.hf_peft import PeftKeys
from ...core.delta import Delta
from ...core.hosts import WEIGHT_HOST_TYPES, host_shape, to_host_layout
from ...core.shared_input import SharedInputGroup


@register_method
class LoRA(PeftKeys, AdapterConfig):
    """LoRA config: rank, scaling, dropout on the input of A, and the initialisation of A and B."""

    method: ClassVar[str] = "lora"
    r: int = Field(8, gt=0, description="rank of ΔW")
    alpha: float = Field(8.0, gt=0, description="scaling numerator: s = alpha/r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of A")
    rslora: bool = Field(False, description="rank-stabilised scaling s = alpha/sqrt(r)")
    init: Literal["zero", "gaussian", "pissa"] = Field("zero", description="zero-B (default), gaussian A, or PiSSA")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def rewrites_base(self) -> bool:
        return self.init == "pissa"

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return WEIGHT_HOST_TYPES

    def build(self, host: nn.Module) -> "LoRADelta":
        return LoRADelta(host, self)

    # --- Hugging Face PEFT interop -------------------------------------------------------
    peft_type: ClassVar[str] = "LORA"
    _PEFT_KEY: ClassVar[re.Pattern] = re.compile(r"(.*)\.lora_(?:embedding_)?([AB])(?:\.weight)?")
    _PEFT_TENSOR_PREFIX: ClassVar[str] = "lora_"
    # PEFT options that change the math; loading them as plain LoRA would give wrong outputs.
    _PEFT_UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "use_dora", "rank_pattern", "alpha_pattern", "lora_bias", "layers_to_transform", "layers_pattern",
        "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora", "use_bdlora",
        "alora_invocation_tokens",
    )

    # Inits that leave W0 untouched; the others (pissa*, olora, corda, loftq, lora_ga) save factors for a rewritten base.
    _PEFT_BASE_PRESERVING_INITS: ClassVar[frozenset[str]] = frozenset({"gaussian", "orthogonal", "eva", "mica"})

    def to_peft(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type, "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": self.targets, "exclude_modules": self.exclude, "use_rslora": self.rslora,
            "init_lora_weights": True if self.init == "zero" else self.init, "bias": "none", "use_dora": False,
            "modules_to_save": self.modules_to_save or None, "task_type": None, "inference_mode": True,
            "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
        }

    @classmethod
    def from_peft(cls, peft: dict[str, Any], modules_to_save: list[str]) -> "LoRA":
        cls.check_peft_options(peft)
        init = peft.get("init_lora_weights", True)
        if isinstance(init, str) and init not in cls._PEFT_BASE_PRESERVING_INITS:
            raise ValueError(f"PEFT LoRA saved with init_lora_weights={init!r} needs its residual base model; "
                             "convert it to plain LoRA in PEFT first")
        return cls(r=peft["r"], alpha=peft.get("lora_alpha", 8), dropout=peft.get("lora_dropout", 0.0),
                   targets=peft["target_modules"], exclude=peft.get("exclude_modules"),
                   rslora=peft.get("use_rslora", False), modules_to_save=modules_to_save)

    @staticmethod
    def peft_tensor_name(tensor_name: str, host: nn.Module) -> str:
        if isinstance(host, nn.Embedding):
            return tensor_name.replace("lora_", "lora_embedding_")
        return f"{tensor_name}.weight"


    def saved_config(self) -> "LoRA":
        """PiSSA is saved as a plain rank-2r LoRA on the *original* W0 (see `LoRADelta.saved_tensors`)."""
        if self.init != "pissa":
            return self
        factor = math.sqrt(2) if self.rslora else 2.0  # keeps s unchanged at rank 2r
        return self.model_copy(update={"r": 2 * self.r, "alpha": self.alpha * factor, "init": "zero"})


class LoRADelta(Delta):
    """One LoRA pair on one host: increment(x) = s · B A dropout(x)."""

    def __init__(self, host: nn.Module, config: LoRA):
        super().__init__()
        shape = host_shape(host)
        r, self.kind, self.scaling = config.r, shape.kind, config.scaling
        if r > min(shape.in_features, shape.out_features) and config.init == "pissa":
            raise ValueError(f"PiSSA rank {r} exceeds min(in, out) = {min(shape.in_features, shape.out_features)}")
        kernel = shape.kernel_size or ()
        ones = (1,) * len(kernel)
        # Adapter weights stay float32 on a half-precision base (as in HF PEFT): AdamW on bf16 factors stalls.
        factory = {"dtype": torch.float32, "device": host.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, shape.in_features, *kernel, **factory))  # [r, in, (kh, kw)]
        self.lora_B = nn.Parameter(torch.zeros(shape.out_features, r, *ones, **factory))  # [out, r, (1, 1)]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.shared: SharedInputGroup | None = None  # set by attach for siblings that share an input
        if self.kind == "conv2d":
            self._conv_args = {k: getattr(host, k) for k in ("stride", "padding", "dilation")}
            # non-zero padding modes pad explicitly (as Conv2d does), so the branch matches the merged weight
            self._pad = None if host.padding_mode == "zeros" else (host._reversed_padding_repeated_twice, host.padding_mode)
            if self._pad is not None:
                self._conv_args["padding"] = 0
        if self.kind == "embedding":
            self._embedding_args = {k: getattr(host, k) for k in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")}
        self._initialise(host, config.init)

    @torch.no_grad()
    def _initialise(self, host: nn.Module, init: str) -> None:
        if init == "pissa":
            return self._pissa(host)
        if self.kind == "embedding":  # A is looked up per token: zero A, random B (as in HF PEFT)
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.lora_A.shape[0])
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def _pissa(self, host: nn.Module) -> None:
        """A, B from the top-r SVD of W0 (split as √S on each side); W0 ← W0 − s·BA."""
        if self.kind not in ("linear", "conv1d"):
            raise ValueError(f"PiSSA init needs a linear host, got {self.kind}")
        r = self.lora_A.shape[0]
        weight = to_host_layout(host, host.weight.float())  # [out, in]
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = (s[:r] / self.scaling).sqrt()
        self.lora_A.copy_(root[:, None] * vh[:r])  # [r, in]
        self.lora_B.copy_(u[:, :r] * root[None, :])  # [out, r]
        self.register_buffer("pissa_A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("pissa_B0", self.lora_B.detach().clone(), persistent=False)
        self.unmerge_from(host)  # the base keeps only the residual
        self.rewrites_base = True

    def restore_base(self, host: nn.Module) -> None:
        """Undo PiSSA's residual: W0 = W_res + s·B0A0."""
        host.weight.data += to_host_layout(host, (self.pissa_B0 @ self.pissa_A0).float() * self.scaling).to(host.weight.dtype)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """W_res + s·BA − W0 = s·[B, −B0][A; A0]: a rank-2r LoRA on the original base."""
        if not self.rewrites_base:
            return super().saved_tensors()
        return {
            "lora_A": torch.cat([self.lora_A, self.pissa_A0]).detach(),
            "lora_B": torch.cat([self.lora_B, -self.pissa_B0], dim=1).detach(),
        }

    def down_weight(self) -> torch.Tensor:
        return self.lora_A

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            return F.embedding(x, self.lora_A.T, **self._embedding_args)
        x = x.to(self.lora_A.dtype)
        if self.kind == "conv2d":
            if self._pad is not None:
                x = F.pad(x, self._pad[0], mode=self._pad[1])
            return F.conv2d(self.dropout(x), self.lora_A, **self._conv_args)
        fuse = self.shared is not None and not (self.training and isinstance(self.dropout, nn.Dropout))
        if fuse:
            return self.shared.project(self, x)
        return F.linear(self.dropout(x), self.lora_A)

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        down = self._down(x)  # [..., r] (conv: [N, r, H', W'])
        if self.kind == "conv2d":
            return F.conv2d(down, self.lora_B) * self.scaling
        return F.linear(down, self.lora_B) * self.scaling

    def add_increment_(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out += s·(A x)Bᵀ as one GEMM accumulating into the host output: no output-sized
        temporary, no separate scaling multiply, no separate add (the three cost ~15% of a
        MiniLM forward with LoRA on every linear layer)."""
        if (not _plain_lora(type(self)) or self.kind not in ("linear", "conv1d") or out.dtype != self.lora_B.dtype
                or not out.is_contiguous()):
            return out.add_(self.increment(x))  # subclasses that change the math (AdaLoRA, DyLoRA, SoRA...) keep theirs
        down = self._down(x)  # [..., r]; may be a strided slice of the shared q/k/v projection
        out.view(-1, out.shape[-1]).addmm_(down.reshape(-1, down.shape[-1]), self.lora_B.t(), alpha=self.scaling)
        return out

    @classmethod
    def add_routed_batch_(cls, deltas: list["LoRADelta"], row_index: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Many adapters in one batch: stack their factors, pick one (A, B) per row, and run
        two batched matmuls in the batch's own row order (no row gather, no index_add_)."""
        first = deltas[0]
        if (not _plain_lora(cls) or first.kind != "linear" or out.dtype != first.lora_B.dtype or not out.is_contiguous()
                or any(d.lora_A.shape != first.lora_A.shape or d.lora_B.shape != first.lora_B.shape
                       or (d.training and isinstance(d.dropout, nn.Dropout)) for d in deltas)):
            return False
        # index G (rows with no adapter on this layer) picks an all-zero pair
        a = torch.stack([*(d.lora_A for d in deltas), first.lora_A.new_zeros(first.lora_A.shape)])  # [G+1, r, in]
        b = torch.stack([*(d.lora_B for d in deltas), first.lora_B.new_zeros(first.lora_B.shape)])  # [G+1, out, r]
        alpha = first.scaling
        if any(d.scaling != alpha for d in deltas):
            b = b * torch.tensor([*(d.scaling for d in deltas), 0.0], dtype=b.dtype, device=b.device)[:, None, None]
            alpha = 1.0
        index = row_index.to(x.device)
        rows = x.shape[0]
        down = torch.bmm(x.reshape(rows, -1, x.shape[-1]).to(a.dtype), a.index_select(0, index).transpose(1, 2))
        out.view(rows, -1, out.shape[-1]).baddbmm_(down, b.index_select(0, index).transpose(1, 2), alpha=alpha)
        return True

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_A.float(), self.lora_B.float()
        if self.kind == "conv2d":  # ΔW[o, i, kh, kw] = Σ_r B[o, r] A[r, i, kh, kw]
            return torch.einsum("or,rikl->oikl", b.flatten(1), a) * self.scaling
        return (b @ a) * self.scaling  # [out, in]


def _plain_lora(cls: type) -> bool:
    """True when a LoRADelta subclass computes plain s·B·A·x (the fused paths above are exact for it)."""
    return all(getattr(cls, m) is getattr(LoRADelta, m) for m in ("increment", "_down", "down_weight"))
