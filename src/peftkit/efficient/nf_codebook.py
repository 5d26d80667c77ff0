"""NormalFloat-k: blockwise absmax quantization onto normal-distribution quantiles, k = 2..8, in pure torch.

QLoRA's NF4 (Dettmers et al., 2023, arXiv:2305.14314) generalised to k bits:

    W ≈ c[q] · absmax(block),   c = sorted({Φ⁻¹(p_i)} ∪ {0} ∪ {−Φ⁻¹(p'_j)}) / max,   q ∈ {0, …, 2^k − 1}

with 2^(k−1) positive quantiles p_i evenly spaced from δ down to ½ (½ excluded), 2^(k−1) − 1 negative ones the same
way, and an exact zero; δ = ½((1 − 1/(2(2^k − 1))) + (1 − 1/(2·2^k))) keeps the extreme quantile finite (δ = 0.9677083
at k = 4, giving bitsandbytes' NF4 table). The weight is flattened row-major and cut into blocks of `block_size`
values; each block keeps its absmax as a float32 scale, each value the index of the nearest code, packed into uint8.

`NFLinear` stores a Linear this way and dequantizes in its forward: slow, meant for 2/3-bit research (LoftQ);
4-bit bases in production use bitsandbytes (`peftkit.efficient.quantize`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packed_linear import PackedLinear

MIN_BITS, MAX_BITS = 2, 8


def _check_bits(bits: int, low: int = MIN_BITS, high: int = MAX_BITS) -> None:
    if not isinstance(bits, int) or not low <= bits <= high:
        raise ValueError(f"bits must be an integer from {low} to {high}, got {bits!r}")


def nf_codebook(bits: int) -> torch.Tensor:
    """The 2^bits NormalFloat codes in [−1, 1], ascending (float32)."""
    _check_bits(bits)
    half = 2 ** (bits - 1)
    offset = 0.5 * ((1 - 1 / (2 * (2 ** bits - 1))) + (1 - 1 / (2 * 2 ** bits)))
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    codes = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (codes / codes.max()).float()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) as a flat uint8 tensor of ⌈n·bits/8⌉ bytes (most significant bit first)."""
    _check_bits(bits, 1, 8)
    shifts = torch.arange(bits - 1, -1, -1, device=codes.device)
    stream = ((codes.reshape(-1, 1).to(torch.int32) >> shifts) & 1).flatten()  # [n·bits] bits
    stream = F.pad(stream, (0, -stream.numel() % 8)).view(-1, 8)
    return (stream << torch.arange(7, -1, -1, device=codes.device)).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of `pack_codes` output, as int64."""
    _check_bits(bits, 1, 8)
    stream = (packed.to(torch.int32).reshape(-1, 1) >> torch.arange(7, -1, -1, device=packed.device)) & 1
    stream = stream.flatten()[: count * bits].view(count, bits)
    return (stream << torch.arange(bits - 1, -1, -1, device=packed.device)).sum(1)


@dataclass(frozen=True)
class NFState:
    """A weight quantized to NF-k: packed codes, one absmax per block, and what it takes to rebuild it."""

    codes: torch.Tensor  # uint8, ⌈numel·bits/8⌉ bytes
    scales: torch.Tensor  # float32 [blocks]: each block's absmax
    bits: int
    block_size: int
    shape: tuple[int, ...]


def quantize_nf(weight: torch.Tensor, bits: int, block_size: int = 64) -> NFState:
    """Blockwise absmax NF-k quantization of `weight` (each value → its nearest code × the block's absmax)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    codebook = nf_codebook(bits).to(weight.device)
    flat = weight.detach().float().flatten()
    blocks = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
    scales = blocks.abs().amax(1)
    normalised = blocks / torch.where(scales > 0, scales, 1.0)[:, None]  # an all-zero block maps to code 0.0
    codes = torch.bucketize(normalised, (codebook[1:] + codebook[:-1]) / 2)  # the nearest code
    return NFState(pack_codes(codes.flatten()[: flat.numel()], bits), scales, bits, block_size, tuple(weight.shape))


def dequantize_nf(state: NFState) -> torch.Tensor:
    """W = codebook[q] × the block's absmax, float32 in the original shape."""
    count = torch.Size(state.shape).numel()
    values = nf_codebook(state.bits).to(state.codes.device)[unpack_codes(state.codes, state.bits, count)]
    blocks = F.pad(values, (0, -count % state.block_size)).view(-1, state.block_size) * state.scales[:, None]
    return blocks.flatten()[:count].view(state.shape)


class NFLinear(PackedLinear):
    """A Linear whose weight is stored NF-k (`quantize_nf`): `weight` holds the packed codes, `weight_scales` the
    block absmaxes; the forward dequantizes (`efficient.packed_linear`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4, block_size: int = 64,
                 device: torch.device | str | None = None):
        _check_bits(bits)
        super().__init__(in_features, out_features, bias, device)
        self.bits, self.block_size = bits, block_size
        self._quantize(torch.zeros(out_features, in_features, device=device))

    def state(self) -> NFState:
        return NFState(self.weight.data, self.weight_scales, self.bits, self.block_size,
                       (self.out_features, self.in_features))

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_nf(self.state())

    def _pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        state = quantize_nf(weight, self.bits, self.block_size)
        return state.codes, {"weight_scales": state.scales}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, block_size={self.block_size}"
