"""Quantized bases (QLoRA): a model's Linear weights stored in 4 or 8 bits through bitsandbytes, frozen, with any
peftkit method trained on top.

    W ≈ code[q] · absmax_b                  4-bit (NF4 / FP4): q ∈ 0..15 per weight, one absmax per block of B weights
    absmax_b ≈ code8[q2_b] · c_g + offset   double quantization: the absmaxes 8-bit, in groups of 256 blocks
    W ≈ CB · SCB_row / 127                  int8: one scale per output row

Each quantized layer is a peftkit subclass of bitsandbytes' `Linear4bit` / `Linear8bitLt`, so it is an nn.Linear to
every method, and it implements `core.hosts.QuantizedHost`: deltas read its weight only as the dequantized float
tensor (DoRA's norm) and write it back only through `store_weight` (merging: dequantize → add ΔW → quantize again,
with the rounding that adds measured, `quantization_errors`). Unmerging puts back the exact stored weight from
before the merge (`core.hosts.RestorableHost`), so merge/unmerge cycles do not drift.

The forward is one path in training and evaluation alike: dequantize a block, multiply in float (bitsandbytes' CPU
inference path, which repacks the weight to bf16 scales and casts activations to bf16, is switched off: it would
make evaluation differ from training and the stored weight differ from what was saved).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ..core.atomic import write_dir_atomically
from ..core.io import read_json
from ..core.registry import REGISTRY_ATTR
from ..core.slot import is_delta_parameter
from ..core.targets import match_targets, own_modules
from ..models import require_extra

require_extra("bitsandbytes", "quant")


def _import_bitsandbytes() -> Any:
    """bitsandbytes, imported without its warning that the optional `kernels` package (which downloads a kernel
    from the hub) is absent: that kernel serves only the CPU inference path this module switches off."""
    bnb_logger = logging.getLogger("bitsandbytes")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (the import that loads the CPU backend)
    finally:
        bnb_logger.setLevel(level)
    return bitsandbytes


bnb = _import_bitsandbytes()
logger = logging.getLogger(__name__)

SCHEME_BITS: dict[str, int] = {"nf4": 4, "fp4": 4, "int8": 8}
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' blockwise kernels accept
COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                          "float16": torch.float16}
WEIGHTS_FILE = "quantized.safetensors"
CONFIG_FILE = "quantization.json"
FORMAT = "peftkit-quantized-base"


class QuantizeConfig(BaseModel):
    """How a base is quantized. Give `scheme`, `bits` or both: bits 4 alone means NF4, bits 8 means int8."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Literal["nf4", "fp4", "int8"] = "nf4"
    bits: Literal[4, 8] = 4
    double_quant: bool = Field(True, description="4-bit: quantize the block scales too (8-bit, groups of 256)")
    block_size: int = Field(64, description="4-bit: weights per scale")
    skip: str | list[str] = Field([], description="modules (and everything below them) left in full precision, "
                                                  "in the targets syntax: names, dotted suffixes, 'type:X', a regex")
    skip_head: bool = Field(True, description="leave the output layer alone (the LM head, a classification head)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="4-bit: the dtype the matmul runs in; None: the input's")

    @model_validator(mode="before")
    @classmethod
    def _scheme_and_bits(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        scheme, bits = data.get("scheme"), data.get("bits")
        if scheme is None and bits is not None:
            data = {**data, "scheme": "int8" if bits == 8 else "nf4"}
        elif bits is None and scheme in SCHEME_BITS:
            data = {**data, "bits": SCHEME_BITS[scheme]}
        return data

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, value: int) -> int:
        if value not in BLOCK_SIZES:
            raise ValueError(f"block size {value} is not supported; use one of {', '.join(map(str, BLOCK_SIZES))}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "QuantizeConfig":
        if SCHEME_BITS[self.scheme] != self.bits:
            raise ValueError(f"bits: scheme {self.scheme} stores {SCHEME_BITS[self.scheme]} bits, not {self.bits}")
        if self.scheme == "int8":
            given = sorted({"block_size", "compute_dtype"} & self.model_fields_set)
            if "double_quant" in self.model_fields_set and self.double_quant:
                given.append("double_quant")
            if given:
                raise ValueError(f"{', '.join(given)}: int8 keeps one scale per row and computes in the input's "
                                 "dtype; these apply to the 4-bit schemes (nf4, fp4) only")
        return self

    @property
    def name(self) -> str:
        """A short name for file names and reports: nf4-dq-b64, fp4-b128, int8."""
        if self.scheme == "int8":
            return "int8"
        return f"{self.scheme}{'-dq' if self.double_quant else ''}-b{self.block_size}"


@dataclass(frozen=True)
class QuantizationError:
    """How far a stored (quantized) weight is from the float weight it was asked to store."""

    max_abs: float
    relative_frobenius: float  # ‖Q(W) − W‖_F / ‖W‖_F

    @classmethod
    def between(cls, exact: torch.Tensor, stored: torch.Tensor) -> "QuantizationError":
        diff = (stored.float() - exact.float())
        norm = float(exact.float().norm())
        return cls(float(diff.abs().max()) if diff.numel() else 0.0, float(diff.norm()) / norm if norm else 0.0)


class _QuantizedLinear:
    """What both quantized Linear types add to bitsandbytes' layers: the QuantizedHost methods, exact restore,
    the rounding error of the last store, and their tensors for saving."""

    store_error: QuantizationError | None = None  # set by store_weight (a merge); None: the weight as quantized

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _quantize(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def store_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` (out, in) and keep it; remember how much the rounding changed it."""
        self._quantize(weight.detach())
        self.store_error = QuantizationError.between(weight, self.dequantized_weight())
        logger.debug("re-quantized %s: max abs error %.3g, relative Frobenius %.3g", type(self).__name__,
                     self.store_error.max_abs, self.store_error.relative_frobenius)

    def stored_state(self) -> tuple[Any, ...]:
        """The stored weight as it is (the objects themselves: a store replaces them rather than writing into them)."""
        raise NotImplementedError

    def restore_state(self, state: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the stored weight occupies (packed values and scales), by name: what is resident."""
        raise NotImplementedError



class Linear4bitHost(_QuantizedLinear, bnb.nn.Linear4bit):
    """A Linear stored in 4 bits (NF4 or FP4, blockwise absmax, optionally double-quantized): bitsandbytes'
    `Linear4bit` as a peftkit host."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantizeConfig,
                 device: torch.device | str | None = None):
        dtype = COMPUTE_DTYPES[config.compute_dtype] if config.compute_dtype else None
        super().__init__(in_features, out_features, bias=bias, compute_dtype=dtype,
                         compress_statistics=config.double_quant, quant_type=config.scheme, device="meta")
        self.support_avx512bf16_for_cpu = False  # one forward for training and evaluation (module docstring)
        self.block_size = config.block_size
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)

    def _params(self, data: torch.Tensor, quant_state: Any = None) -> Any:
        return bnb.nn.Params4bit(data, requires_grad=False, quant_state=quant_state, blocksize=self.block_size,
                                 compress_statistics=self.weight.compress_statistics, quant_type=self.weight.quant_type,
                                 module=self, bnb_quantized=quant_state is not None)

    def _quantize(self, weight: torch.Tensor) -> None:
        self.weight = self._params(weight.to(torch.float32).contiguous())._quantize(weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state).to(torch.float32)

    def stored_state(self) -> tuple[Any, ...]:
        return self.weight, self.quant_state, self.store_error

    def restore_state(self, state: tuple[Any, ...]) -> None:
        self.weight, self.quant_state, self.store_error = state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = self.weight.quant_state
        tensors = {"weight": self.weight.data, "absmax": state.absmax, "code": state.code}
        if state.nested:
            tensors |= {"nested_absmax": state.state2.absmax, "nested_code": state.state2.code, "offset": state.offset}
        return tensors

    def load_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the packed weight and quant state saved by `Linear4bit`'s state dict, as they are."""
        stats = {key.removeprefix("weight."): value for key, value in tensors.items() if key.startswith("weight.")}
        self.weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, device=tensors["weight"].device,
                                                          module=self)
        self.block_size = self.weight.blocksize


class Linear8bitHost(_QuantizedLinear, bnb.nn.Linear8bitLt):
    """A Linear stored in int8 with one scale per output row (LLM.int8() without outlier columns): bitsandbytes'
    `Linear8bitLt` as a peftkit host. Its forward always dequantizes and multiplies in the input's dtype
    (bitsandbytes' training path on a CPU); the inference path would quantize the activations to int8 as well."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantizeConfig,
                 device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias=bias, has_fp16_weights=False, threshold=0.0, device="meta")
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)

    def _quantize(self, weight: torch.Tensor) -> None:
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        self._keep(codes, scales)

    def _keep(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False)
        self.state.CB, self.state.SCB = codes, scales

    def dequantized_weight(self) -> torch.Tensor:
        # the expression bitsandbytes' forward uses, so that this is bit for bit the weight the forward multiplies by
        return self.state.CB.to(torch.float32).mul_(self.state.SCB.unsqueeze(1).mul(1.0 / 127.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.state.is_training = True  # dequantize + float matmul also in evaluation (see the class docstring)
        return bnb.matmul(x, self.weight, bias=self.bias, state=self.state)

    def stored_state(self) -> tuple[Any, ...]:
        return self.weight, self.state.CB, self.state.SCB, self.store_error

    def restore_state(self, state: tuple[Any, ...]) -> None:
        self.weight, self.state.CB, self.state.SCB, self.store_error = state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.state.CB, "SCB": self.state.SCB}

    def load_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        self._keep(tensors["weight"], tensors["SCB"])


HOST_TYPES: dict[str, type[_QuantizedLinear]] = {"nf4": Linear4bitHost, "fp4": Linear4bitHost, "int8": Linear8bitHost}


def quantized_linear(linear: nn.Linear, config: QuantizeConfig) -> _QuantizedLinear:
    """A frozen quantized copy of `linear` (its bias kept in its own dtype, frozen)."""
    host = HOST_TYPES[config.scheme](linear.in_features, linear.out_features, linear.bias is not None, config,
                                     device=linear.weight.device)
    host._quantize(linear.weight.detach())
    if linear.bias is not None:
        host.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    host.train(linear.training)
    return host


# --- which layers ---------------------------------------------------------------------------------


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def head_names(model: nn.Module) -> set[str]:
    """The model's output layer: its output embeddings (an LM head) if it declares them, and its last Linear in
    model order (a classification head such as BERT's `classifier`), as transformers' bitsandbytes loader does."""
    modules = [(name, module) for name, module in own_modules(model) if name]
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = {name for name, module in modules if head is not None and module is head}
    linears = [name for name, module in modules if isinstance(module, nn.Linear)]
    return names | set(linears[-1:])


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """Parameter names by storage, for the storages more than one parameter name uses (tied weights)."""
    by_storage: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(param.untyped_storage().data_ptr(), []).append(name)
    return {ptr: names for ptr, names in by_storage.items() if len(names) > 1}


def choose_layers(model: nn.Module, config: QuantizeConfig) -> tuple[list[str], dict[str, str]]:
    """(names of the Linear layers to quantize, {name: why not} for the Linear layers left alone).

    Only plain `nn.Linear` layers are quantized: a subclass (MultiheadAttention's out_proj) may read its weight
    directly, which a packed weight would break."""
    skipped_roots = set(match_targets(model, config.skip)) if config.skip else set()
    heads = head_names(model) if config.skip_head else set()
    shared = {name.rpartition(".")[0]: names for names in _shared_weights(model).values() for name in names}
    chosen, skipped = [], {}
    for name, module in own_modules(model):
        if not isinstance(module, nn.Linear) or not name:
            continue
        if any(name == root or name.startswith(root + ".") for root in skipped_roots):
            skipped[name] = "skip"
        elif name in heads:
            skipped[name] = "output head (skip_head)"
        elif type(module) is not nn.Linear:
            skipped[name] = f"{type(module).__name__} is not a plain nn.Linear"
        elif name in shared:
            skipped[name] = f"weight tied to {', '.join(n for n in shared[name] if not n.startswith(name + '.'))}"
        else:
            chosen.append(name)
    return chosen, skipped


# --- quantize -------------------------------------------------------------------------------------


@dataclass
class QuantizeReport:
    """What `quantize` did: the layers quantized and left alone, and the model's resident bytes before and after."""

    config: QuantizeConfig
    quantized: list[str]
    skipped: dict[str, str]  # name -> why
    bytes_before: int
    bytes_after: int

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before

    def __str__(self) -> str:
        skipped = ", ".join(f"{name} ({why})" for name, why in self.skipped.items()) or "none"
        return (f"quantized {len(self.quantized)} Linear layers to {self.config.name}; resident weights "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB ({self.ratio:.3f}x); "
                f"left in full precision: {skipped}")


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, buffers and quantization states, each storage counted once (tied weights,
    shared codebooks)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for module in model.modules() if isinstance(module, _QuantizedLinear)
                for t in module.state_tensors().values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def quantize(model: nn.Module, bits: int | None = None, scheme: str | None = None, double_quant: bool | None = None,
             block_size: int | None = None, skip: str | list[str] = (), skip_head: bool = True,
             compute_dtype: str | None = None, config: QuantizeConfig | None = None) -> QuantizeReport:
    """Replace the model's Linear layers, in place, by frozen quantized ones, leaving the output head and `skip` in
    full precision. The arguments are `QuantizeConfig`'s (or give `config`); unset: NF4 with double quantization in
    blocks of 64. Quantize before attaching adapters. Returns what was quantized and the resident bytes."""
    if config is None:
        given = {"bits": bits, "scheme": scheme, "double_quant": double_quant, "block_size": block_size,
                 "compute_dtype": compute_dtype}
        config = QuantizeConfig(**{k: v for k, v in given.items() if v is not None},
                                skip=skip if isinstance(skip, str) else list(skip), skip_head=skip_head)
    if model.__dict__.get(REGISTRY_ATTR) is not None and model.__dict__[REGISTRY_ATTR].configs:
        raise ValueError("quantize the base before attaching adapters: this model already has adapters attached")
    names, skipped = choose_layers(model, config)
    if not names:
        raise ValueError(f"no Linear layer to quantize (left alone: {skipped or 'the model has no nn.Linear'})")
    before = resident_bytes(model)
    for name in names:
        _set_module(model, name, quantized_linear(model.get_submodule(name), config))
    model.__dict__["peftkit_quantization"] = config
    return QuantizeReport(config, names, skipped, before, resident_bytes(model))


def quantized_layers(model: nn.Module) -> dict[str, _QuantizedLinear]:
    """The model's quantized Linear layers by name."""
    return {name: module for name, module in own_modules(model) if isinstance(module, _QuantizedLinear)}


def quantization_errors(model: nn.Module) -> dict[str, QuantizationError]:
    """For each quantized layer whose weight was rewritten (a merge folded into it): how far the re-quantized weight
    is from the exact float weight asked for. Layers holding their weight as first quantized are left out."""
    return {name: host.store_error for name, host in quantized_layers(model).items() if host.store_error is not None}
