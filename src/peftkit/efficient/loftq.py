"""LoftQ: LoRA-Fine-Tuning-aware Quantization for Large Language Models (Li et al., 2023, arXiv:2310.08659).

    Q_t = quant(W − s·B_{t−1}A_{t−1}),   s·B_t A_t = SVD_r(W − dequant(Q_t)),   t = 1..T,   B_0 A_0 = 0

so that the quantized base and the LoRA factors start at dequant(Q_T) + s·B_T A_T ≈ W, where zero-init QLoRA starts
at dequant(quant(W)) — far from W at 2 and 3 bits. SVD_r keeps the top r singular triplets, split as √σ on each
side (PiSSA's split): B = U_r √(Σ_r/s), A = √(Σ_r/s) V_rᵀ.

The quantizer is any `core.hosts.QuantizedHost` (quant ∘ dequant = its `store_weight` then `dequantized_weight`), so
Q is exactly what such a host stores. Two ways in:

- LoRA's `init="loftq"` on a full-precision model (`LoRA(init="loftq", loftq=LoftQOptions(bits=2))`): each target's
  weight becomes dequant(Q) in place (the model then computes exactly what the quantized model would; PEFT's LoftQ
  does the same); removing the adapter puts W back. Saved as a plain LoRA for that base.
- `loftq_initialise(model, adapter, weights)` on a model already quantized (`peftkit.efficient.quantize`,
  `NFLinear`): the hosts re-store Q computed from the original float `weights`, and the adapter's factors are set;
  the memory of a quantized base from the start.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..core.delta import ModuleCopy
from ..core.hosts import QuantizedHost, host_shape, read_weight, to_host_layout
from ..core.registry import adapter_deltas, get_registry
from .nf_codebook import MAX_BITS, MIN_BITS, NFLinear


class LoftQOptions(BaseModel):
    """LoftQ's quantizer and iteration count (LoRA's `loftq` field, with init='loftq')."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(4, ge=MIN_BITS, le=MAX_BITS, description="4: bitsandbytes NF4 (double quantization, as "
                                                                  "peftkit.efficient.quantize); others: NF-k")
    iters: int = Field(5, ge=1, description="T: alternations of quantization and SVD")
    block_size: int = Field(64, gt=0, description="weights per absmax scale")

    def quantizer(self, out_features: int, in_features: int, device: torch.device) -> nn.Linear:
        """A QuantizedHost for an (out, in) weight that stores it as this LoftQ quantizes."""
        if self.bits == 4:
            from .bnb_linear import Linear4bitHost  # bitsandbytes: imported only when used
            from .quantize import QuantizeConfig

            return Linear4bitHost(in_features, out_features, False, QuantizeConfig(block_size=self.block_size),
                                  device=device)
        return NFLinear(in_features, out_features, bias=False, bits=self.bits, block_size=self.block_size,
                        device=device)


@dataclass(frozen=True)
class LoftQResult:
    """The factors, the base they go with, and how far each start is from W (Frobenius norms)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    base: torch.Tensor  # dequant(Q_T), [out, in]
    error: float  # ‖W − (dequant(Q_T) + s·BA)‖_F
    qlora_error: float  # ‖W − dequant(quant(W))‖_F: zero-init QLoRA's start


@torch.no_grad()
def loftq(weight: torch.Tensor, rank: int, scaling: float, iters: int, quantizer: QuantizedHost) -> LoftQResult:
    """T LoftQ alternations on `weight` (out, in), keeping the iterate nearest W: the alternation is not monotone
    (a 2-bit Q_t can land farther off than Q_1), and the first iterate is already no worse than zero-init QLoRA.
    `quantizer` is left storing the kept Q."""
    target = weight.detach().float()
    low_rank = torch.zeros_like(target)
    best: tuple[float, torch.Tensor, LoftQResult] | None = None  # (error, what was quantized, result)
    for _ in range(iters):
        quantized = target - low_rank
        quantizer.store_weight(quantized)
        base = quantizer.dequantized_weight().to(target.device)
        u, sigma, vh = torch.linalg.svd(target - base, full_matrices=False)
        low_rank = (u[:, :rank] * sigma[:rank]) @ vh[:rank]
        error = float((target - base - low_rank).norm())
        if best is None or error < best[0]:
            root = (sigma[:rank] / scaling).sqrt()
            qlora_error = best[2].qlora_error if best else float((target - base).norm())  # Q_1 = quant(W)
            best = error, quantized, LoftQResult(root[:, None] * vh[:rank], u[:, :rank] * root, base, error, qlora_error)
    if best[1] is not quantized:
        quantizer.store_weight(best[1])  # quantizing is deterministic: the kept Q again
    return best[2]


def loftq_start(host: nn.Module, rank: int, scaling: float, options: LoftQOptions) -> LoftQResult:
    """LoftQ for a full-precision Linear (or GPT-2 Conv1D) host, its weight read in (out, in) layout."""
    if isinstance(host, QuantizedHost):
        raise ValueError(f"LoftQ needs the full-precision weight, but this {type(host).__name__} stores it quantized "
                         "already: attach init='loftq' to the float model, or run "
                         "peftkit.efficient.loftq.loftq_initialise with the original weights")
    shape = host_shape(host)
    if shape.kind not in ("linear", "conv1d"):
        raise ValueError(f"LoftQ init needs a linear host, got {shape.kind}")
    weight = to_host_layout(host, read_weight(host).detach())
    return loftq(weight, rank, scaling, options.iters,
                 options.quantizer(shape.out_features, shape.in_features, weight.device))


@torch.no_grad()
def loftq_initialise(model: nn.Module, adapter: str, weights: Mapping[str, torch.Tensor],
                     iters: int = 5) -> dict[str, LoftQResult]:
    """LoftQ for a LoRA adapter attached to quantized hosts: each host (a QuantizedHost) stores Q_T computed from its
    original float weight `weights["<host>.weight"]` (a state dict of the model before quantizing), and the adapter's
    A, B are set; the adapter's trainable module copies (`modules_to_save`, a fresh head) are left as they are. Q_T
    is the base as quantized, so no host reports it as a merge's rounding (`quantization_errors`). Returns each
    host's result (its errors against zero-init QLoRA's)."""
    if adapter in get_registry(model).merged:
        raise ValueError(f"adapter {adapter!r} is merged; unmerge it before initialising it")
    deltas = [(n, host, d) for n, host, d in adapter_deltas(model, adapter) if not isinstance(d, ModuleCopy)]
    problems = {"are not quantized": [n for n, host, _ in deltas if not isinstance(host, QuantizedHost)],
                "hold no plain LoRA on a Linear": [n for n, _, d in deltas if not _plain_linear_lora(d)],
                "have no original weight in `weights`": [n for n, _, _ in deltas if f"{n}.weight" not in weights]}
    for problem, names in problems.items():
        if names:
            raise ValueError(f"LoftQ on adapter {adapter!r}: modules {names[:5]} {problem}")
    results = {}
    for name, host, delta in deltas:
        original = weights[f"{name}.weight"].to(host.dequantized_weight().device)
        result = loftq(original, delta.lora_A.shape[0], delta.scaling, iters, host)
        host.store_error = None
        delta.lora_A.copy_(result.a)
        delta.lora_B.copy_(result.b)
        results[name] = result
    return results


def _plain_linear_lora(delta: nn.Module) -> bool:
    """A plain LoRA delta (s·B A x, A [r, in], B [out, r]) on a Linear: what LoftQ's factors are."""
    from ..methods.reparameterized.lora import LoRADelta  # lora imports this module for its init option

    return type(delta) is LoRADelta and delta.kind == "linear"
