"""The base module types a weight delta can sit on, how their weights are laid out, and how deltas reach them.

Every weight-delta method (LoRA and its variants) speaks in one layout: ΔW has shape
(out_features, in_features[, kh, kw]). This module is the one place that knows GPT-2's
`Conv1D` stores its weight transposed and that an Embedding's "input" is its vocabulary.

Deltas read a host's own parameters through `read_weight` (DoRA's norm, PiSSA's SVD, a folded call's W0) and
change them through `edited_weight` (merge folds, PiSSA's residual, OFT's rotation): the one place where a base
stored in another form (quantized) will be turned into a tensor and written back.
"""
from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

try:  # transformers is a dependency, but keep core importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,) + ((Conv1D,) if Conv1D else ())


class RMSNormLike(abc.ABC):
    """Any RMS normalisation layer, h = w ⊙ x / rms(x): torch's nn.RMSNorm and transformers' per-model classes
    (LlamaRMSNorm, Qwen2RMSNorm, ...), which share no base class but the name, for isinstance checks."""

    @classmethod
    def __subclasshook__(cls, subclass: type) -> bool:
        return any(c.__name__.endswith("RMSNorm") for c in subclass.__mro__) or NotImplemented
WEIGHT_HOST_TYPES: tuple[type[nn.Module], ...] = LINEAR_TYPES + (nn.Conv2d, nn.Embedding)


@dataclass(frozen=True)
class HostShape:
    """Sizes of a host module in ΔW's (out, in) convention."""

    kind: str  # "linear" | "conv1d" | "conv2d" | "embedding"
    in_features: int
    out_features: int
    kernel_size: tuple[int, ...] = ()


def host_shape(module: nn.Module) -> HostShape:
    """Describe `module` as a weight-delta host, or raise TypeError naming its type."""
    if isinstance(module, nn.Linear):
        return HostShape("linear", module.in_features, module.out_features)
    if Conv1D is not None and isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape  # Conv1D keeps W as (in, out)
        return HostShape("conv1d", in_features, out_features)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise TypeError(f"Conv2d with groups={module.groups} is not supported as a weight-delta host (groups must be 1)")
        return HostShape("conv2d", module.in_channels, module.out_channels, tuple(module.kernel_size))
    if isinstance(module, nn.Embedding):
        return HostShape("embedding", module.num_embeddings, module.embedding_dim)
    supported = ", ".join(t.__name__ for t in WEIGHT_HOST_TYPES)
    raise TypeError(f"{type(module).__name__} is not a supported weight-delta host (supported: {supported})")


def to_host_layout(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """Turn ΔW from (out, in[, k...]) into the layout of `module.weight`."""
    kind = host_shape(module).kind
    if kind in ("conv1d", "embedding"):  # both store (in, out)
        return delta.T
    return delta


@runtime_checkable
class QuantizedHost(Protocol):
    """A Linear whose weight is stored compressed (4-bit, grouped INT4, ...): deltas see it only as a float tensor."""

    def dequantized_weight(self) -> torch.Tensor:
        """W as float32, (out_features, in_features)."""

    def store_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` (out_features, in_features) and keep it as the stored weight."""


@runtime_checkable
class RestorableHost(Protocol):
    """A quantized host that can put back a weight it stored before, bit for bit: unmerging then restores the weight
    from before the merge instead of quantizing W − ΔW again (which would add a second rounding each cycle)."""

    def stored_state(self) -> object:
        """The stored weight as it is now, to give to `restore_state` later."""

    def restore_state(self, state: object) -> None:
        """Make `state` (from `stored_state`) the stored weight again."""


def stored_state(host: nn.Module) -> object | None:
    """What restores the host's stored weight exactly (`RestorableHost`), or None for a float host, whose weight
    `edited_weight` changes in place (an unmerge subtracts what the merge added, exact to float rounding)."""
    return host.stored_state() if isinstance(host, RestorableHost) else None


def refusal_to_train(host: nn.Module) -> str | None:
    """Why a delta that trains the host's own parameters (a selective change, a trainable copy) cannot sit on it."""
    if isinstance(host, QuantizedHost):
        return (f"its weight is stored quantized ({type(host).__name__}) and frozen, so its own parameters cannot "
                "be trained; adapt it with a method that adds parameters (LoRA, DoRA, (IA)³, ...), or apply the "
                "selective method to the modules left in full precision (norms, unquantized layers and tables)")
    return None


def read_weight(host: nn.Module, name: str = "weight") -> torch.Tensor:
    """The host's parameter `name` (its weight, its bias) as a tensor in the host's own layout, to compute with."""
    if name == "weight" and isinstance(host, QuantizedHost):
        return host.dequantized_weight()
    return getattr(host, name)


@contextmanager
def edited_weight(host: nn.Module, name: str = "weight") -> Iterator[torch.Tensor]:
    """The host's parameter `name` in its own layout, to change in place inside the block (no autograd record).
    A quantized weight is dequantized for the block and quantized again after it."""
    if name == "weight" and isinstance(host, QuantizedHost):
        weight = host.dequantized_weight()
        yield weight
        host.store_weight(weight)
        return
    yield getattr(host, name).data
