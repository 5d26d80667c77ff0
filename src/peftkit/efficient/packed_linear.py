"""A Linear whose frozen weight is stored packed in pure torch: what NF-k (`efficient.nf_codebook.NFLinear`) and
grouped INT4 (`efficient.int4.GroupINT4Linear`) share.

    y = x dequantize(codes, scales)ᵀ + b      codes: uint8 `weight`; scales (zero points): buffers; b: float

The float weight is never materialised: the forward dequantizes it through `efficient.frozen_matmul` (not kept for
the backward). A store replaces the packed tensors rather than writing into them, so the tensors held before a merge
are the weight from before it, put back bit for bit on unmerge (`core.hosts.RestorableHost`); a store made by a merge
records its rounding error (`quantization_errors`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .frozen_matmul import frozen_linear
from .quantize import QuantizedModule


class PackedLinear(QuantizedModule, nn.Linear):
    """`weight` holds the packed codes (uint8, frozen, as bitsandbytes' `Linear4bit`), buffers the per-block
    constants; a subclass says how to pack (`_pack`) and unpack (`dequantized_weight`). A QuantizedHost and a
    RestorableHost."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias, device="meta")  # the float weight is never materialised
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8, device=device), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *settings: Any, **named: Any) -> "PackedLinear":
        """`linear` packed with the class's own settings (bits and block size, group size); its bias kept as it
        is, in its own dtype."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, *settings,
                     device=linear.weight.device, **named)
        module._quantize(linear.weight.detach())
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        module.train(linear.training)
        return module

    def _pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(codes as uint8, {buffer name: tensor}) storing `weight` (out, in), float32."""
        raise NotImplementedError

    def _quantize(self, weight: torch.Tensor) -> None:
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"{type(self).__name__} stores a {expected} weight, got {tuple(weight.shape)}")
        self._keep(*self._pack(weight.detach().float()))

    def _keep(self, codes: torch.Tensor, constants: dict[str, torch.Tensor]) -> None:
        self.weight.data = codes
        for name, tensor in constants.items():
            self.register_buffer(name, tensor)

    def stored_state(self) -> tuple[Any, ...]:
        return self.weight.data, dict(self._buffers), self.store_error

    def restore_state(self, state: tuple[Any, ...]) -> None:
        codes, constants, self.store_error = state
        self._keep(codes, constants)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.data, **self._buffers}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the dequantized weight is not kept for the backward
        return frozen_linear(x, lambda rows: self.dequantized_weight()[rows], self.out_features, self.bias)
