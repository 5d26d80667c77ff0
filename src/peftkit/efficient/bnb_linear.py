"""bitsandbytes' quantized Linear layers as peftkit hosts (`core.hosts.QuantizedHost`): the backend of
`efficient.quantize`, imported only when a model is quantized (bitsandbytes is the `quant` extra).

Measured on this machine's CPU (one thread, 2048×2048 Linear, forward ms at batch 1 / 8 / 64): fp32 0.6 / 3.6 / 16.2,
bitsandbytes 0.50.2 NF4 7.6 / 10.7 / 22.9, torchao 0.18 NF4 71 / 52 / 86: bitsandbytes is the backend.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..models import require_extra
from .quantize import COMPUTE_DTYPES, QuantizeConfig, QuantizedModule

require_extra("bitsandbytes", "quant")


def _import_bitsandbytes() -> Any:
    """bitsandbytes, imported without its warning that the optional `kernels` package (which downloads a kernel
    from the hub) is absent: that kernel serves only the CPU inference path these layers switch off."""
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


def int8_rows(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 codes (…, width) times their rows' absmax / 127, as float32: the expression bitsandbytes' int8 forward
    uses, so that this is bit for bit the weight it multiplies by."""
    return codes.to(torch.float32).mul_(scales.unsqueeze(-1).mul(1.0 / 127.0))


def quant_state_tensors(state: Any) -> dict[str, torch.Tensor]:
    """A 4-bit quant state's tensors by name: the block absmaxes and the code, and with double quantization the
    absmaxes' own absmaxes, code and offset."""
    tensors = {"absmax": state.absmax, "code": state.code}
    if state.nested:
        tensors |= {"nested_absmax": state.state2.absmax, "nested_code": state.state2.code,
                    "offset": state.offset.reshape(1)}
    return tensors


def _rows_call(call: Any, x: torch.Tensor) -> torch.Tensor:
    """`call` on x's rows as one 2-D batch, reshaped back. bitsandbytes' autograd functions return a view for a
    3-D input, which a delta adding into the output in place (LoRA's fused addmm) may not modify; a 2-D result is
    not a view, and the view made here is an ordinary one."""
    out = call(x.reshape(-1, x.shape[-1]))
    return out.view(*x.shape[:-1], out.shape[-1])


class Linear4bitHost(QuantizedModule, bnb.nn.Linear4bit):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rows_call(super().forward, x)

    def dequantized_weight(self) -> torch.Tensor:
        return bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state).to(torch.float32)

    def stored_state(self) -> tuple[Any, ...]:
        return self.weight, self.quant_state, self.store_error

    def restore_state(self, state: tuple[Any, ...]) -> None:
        self.weight, self.quant_state, self.store_error = state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.data, **quant_state_tensors(self.weight.quant_state)}

    def load_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the packed weight and quant state saved by `Linear4bit`'s state dict, as they are."""
        stats = {key.removeprefix("weight."): value for key, value in tensors.items() if key.startswith("weight.")}
        self.weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, device=tensors["weight"].device,
                                                          module=self)
        self.block_size = self.weight.blocksize


class Linear8bitHost(QuantizedModule, bnb.nn.Linear8bitLt):
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
        return int8_rows(self.state.CB, self.state.SCB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.state.is_training = True  # dequantize + float matmul also in evaluation (see the class docstring)
        return _rows_call(lambda rows: bnb.matmul(rows, self.weight, bias=self.bias, state=self.state), x)

    def stored_state(self) -> tuple[Any, ...]:
        return self.weight, self.state.CB, self.state.SCB, self.store_error

    def restore_state(self, state: tuple[Any, ...]) -> None:
        self.weight, self.state.CB, self.state.SCB, self.store_error = state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.state.CB, "SCB": self.state.SCB}

    def load_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        self._keep(tensors["weight"], tensors["SCB"])


HOST_TYPES: dict[str, type[QuantizedModule]] = {"nf4": Linear4bitHost, "fp4": Linear4bitHost, "int8": Linear8bitHost}


def quantized_linear(linear: nn.Linear, config: QuantizeConfig) -> QuantizedModule:
    """A frozen quantized copy of `linear` (its bias kept in its own dtype, frozen)."""
    host = HOST_TYPES[config.scheme](linear.in_features, linear.out_features, linear.bias is not None, config,
                                     device=linear.weight.device)
    host._quantize(linear.weight.detach())
    if linear.bias is not None:
        host.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    host.train(linear.training)
    return host
