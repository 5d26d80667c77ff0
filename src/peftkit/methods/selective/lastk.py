"""Last-k layers: freeze all but the top k blocks of the network and train those whole
(the classic partial fine-tuning baseline, e.g. Lee et al., 2019, arXiv:1911.03090).

    W' = W0 + ΔW  for every parameter inside blocks n−k … n−1;  W' = W0 elsewhere

Each host inside the chosen blocks gets a dense ΔW (and Δb): the base is never written, several
last-k adapters can share one model, rows route per adapter, and merging adds ΔW exactly.
`blocks` names the ModuleList of blocks (default: the model's longest one, e.g. `bert.encoder.layer`);
`targets` / `exclude` filter the modules inside the top k blocks (default: all of them).
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import nn

from ...core.config import TargetSpec, register_method
from ...core.targets import TargetError, block_list, match_targets
from .mask import Mask
from .sparse import SPARSE_HOST_TYPES, SelectiveConfig, whole_masks


@register_method
class LastK(SelectiveConfig):
    """Last-k config: how many top blocks train, and where the blocks are."""

    method: ClassVar[str] = "lastk"
    k: int = Field(gt=0, description="number of top blocks to train")
    blocks: str | None = Field(None, description="name of the ModuleList of blocks (default: the longest one)")
    targets: TargetSpec = ".*"

    def choose_hosts(self, model: nn.Module) -> list[str]:
        blocks, count = block_list(model, self.blocks)
        if self.k > count:
            raise TargetError(f"k={self.k} but {blocks!r} holds only {count} blocks")
        top = tuple(f"{blocks}.{i}." for i in range(count - self.k, count))
        modules = dict(model.named_modules())
        hosts = [n for n in match_targets(model, self.targets, self.exclude)
                 if f"{n}.".startswith(top) and next(modules[n].parameters(recurse=False), None) is not None]
        if not hosts:
            raise TargetError(f"targets {self.targets!r} select no module with parameters in the top {self.k} blocks of {blocks!r}")
        wrong = [f"{n} ({type(modules[n]).__name__})" for n in hosts if not isinstance(modules[n], SPARSE_HOST_TYPES)]
        if wrong:
            raise TargetError(f"the top {self.k} blocks hold modules last-k cannot adapt: {', '.join(wrong[:5])}; "
                              f"supported types: {', '.join(t.__name__ for t in SPARSE_HOST_TYPES)} (exclude the others)")
        return hosts

    def masks(self, hosts: dict[str, nn.Module]) -> dict[str, Mask]:
        return whole_masks(hosts, self.param_names)
