"""Keep-masks over a delta's own parameters: pruned entries stay exactly zero (SparseAdapter, `efficient.sparse_adapter`).

A delta with masks holds them in a `pruned` submodule, one boolean buffer per masked parameter under the same name
(`pruned.down.weight` masks `down.weight`; True = kept). Every masked parameter's gradient is multiplied by its mask
as autograd computes it, so no optimizer step moves a pruned entry (Adam's moments of an entry whose gradient is
always zero stay zero, and weight decay keeps a zero at zero).

Saved in peftkit's format, a masked parameter `P` is written sparse: `P.kept_values` (its kept entries, row-major)
and `P.kept_bits` (the mask, 8 entries a byte), which is smaller than the dense tensor from 1/32 sparsity on; loading
rebuilds the dense tensor and the mask, so a saved and loaded adapter keeps both. The file says which tensors are
pruned, so any delta whose file holds such keys gets its masks back.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

MASKS_ATTR = "pruned"
VALUES, BITS = "kept_values", "kept_bits"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


class WeightMasks(nn.Module):
    """The keep-masks of one delta's parameters (buffers named like the parameters), and their gradient hooks."""

    def __init__(self) -> None:
        super().__init__()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def paths(self) -> list[str]:
        return [name for name, _ in self.named_buffers()]

    def mask(self, path: str) -> torch.Tensor:
        return self.get_buffer(path)

    def _add(self, path: str, mask: torch.Tensor) -> None:
        *parents, leaf = path.split(".")
        node: nn.Module = self
        for part in parents:  # nested modules, so a buffer keeps its parameter's dotted name
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.register_buffer(leaf, mask)

    def release(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def weight_masks(delta: nn.Module) -> WeightMasks | None:
    """The delta's masks, or None when it has none."""
    return delta._modules.get(MASKS_ATTR)


@torch.no_grad()
def install_masks(delta: nn.Module, masks: dict[str, torch.Tensor]) -> WeightMasks:
    """Mask these parameters of `delta` (name -> boolean keep-mask of its shape): their pruned entries are set to zero
    and their gradients masked from now on; masks the delta had before are replaced."""
    old = weight_masks(delta)
    if old is not None:
        old.release()
        del delta._modules[MASKS_ATTR]
    holder = WeightMasks()
    for path, mask in masks.items():
        param = delta.get_parameter(path)
        if mask.shape != param.shape or mask.dtype != torch.bool:
            raise ValueError(f"the mask of {path} must be a bool tensor of shape {tuple(param.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        holder._add(path, mask.to(param.device))
        param.mul_(holder.mask(path))
        holder._hooks.append(param.register_hook(functools.partial(_masked_gradient, holder, path)))
    delta.add_module(MASKS_ATTR, holder)
    return holder


def _masked_gradient(holder: WeightMasks, path: str, grad: torch.Tensor) -> torch.Tensor:
    return grad * holder.mask(path)  # read at backward time: the buffer follows the model across devices


@torch.no_grad()
def apply_masks(delta: nn.Module) -> None:
    """Zero the pruned entries again (after an optimizer step that might not keep zeros by itself)."""
    holder = weight_masks(delta)
    for path in holder.paths() if holder is not None else []:
        delta.get_parameter(path).mul_(holder.mask(path))


def sparse_form(delta: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The delta's saved tensors with every masked parameter as kept values + packed mask bits."""
    holder = weight_masks(delta)
    if holder is None:
        return tensors
    tensors = dict(tensors)
    for path in holder.paths():
        mask = tensors.pop(f"{MASKS_ATTR}.{path}").bool()
        tensors[f"{path}.{VALUES}"] = tensors.pop(path)[mask]
        tensors[f"{path}.{BITS}"] = _pack_bits(mask)
    return tensors


def dense_form(delta: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Turn a file's sparse tensors for `delta` back into dense ones and their masks, in place, and give the delta
    masks to receive them; keys naming no parameter of the delta are left for the file-fit report."""
    paths = [key.removesuffix(f".{BITS}") for key in saved if key.endswith(f".{BITS}")]
    params = dict(delta.named_parameters())
    paths = [path for path in paths if path in params]
    if not paths:
        return
    holder = weight_masks(delta)
    kept = {path: holder.mask(path) for path in holder.paths()} if holder is not None else {}
    for path in paths:
        if f"{path}.{VALUES}" not in saved:
            raise ValueError(f"the file holds the pruning mask {path}.{BITS} without the kept values {path}.{VALUES}")
        param = params[path]
        mask = _unpack_bits(saved.pop(f"{path}.{BITS}"), param.shape, path)
        values = saved.pop(f"{path}.{VALUES}")
        if values.dim() != 1 or values.numel() != int(mask.sum()):
            raise ValueError(f"{path}.{VALUES} holds {tuple(values.shape)} values but its mask keeps {int(mask.sum())}")
        saved[path] = torch.zeros(param.shape, dtype=values.dtype).masked_scatter(mask, values)
        saved[f"{MASKS_ATTR}.{path}"] = mask
        kept.setdefault(path, torch.ones_like(mask))
    install_masks(delta, {path: mask.to(params[path].device) for path, mask in kept.items()})  # filled by the load


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    return (flat * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8).cpu()


def _unpack_bits(bits: torch.Tensor, shape: torch.Size, path: str) -> torch.Tensor:
    count = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != math.ceil(count / 8):
        raise ValueError(f"{path}.{BITS} must be {math.ceil(count / 8)} uint8 bytes for a tensor of shape "
                         f"{tuple(shape)}, got {bits.dtype} {tuple(bits.shape)}")
    unpacked = (bits[:, None] & _BIT_WEIGHTS) != 0
    return unpacked.flatten()[:count].view(shape)
