"""Visual Prompt Tuning (Jia et al., 2022, arXiv:2203.12119): learned prompt tokens in a frozen vision transformer.

    shallow:  [x_1, Z_1, E_1] = L_1([x_0, P, E_0]),     [x_i, Z_i, E_i] = L_i([x_{i-1}, Z_{i-1}, E_{i-1}])
    deep:     [x_i, _, E_i]   = L_i([x_{i-1}, P_{i-1}, E_{i-1}])      for every layer i = 1 … N
    (x: the CLS token, E: the patch tokens, P, P_i ∈ R^{p × d} trainable, p = num_tokens)

Shallow inserts p prompt tokens once, right after the CLS token of the patch embedding's output; deep inserts P_0
there too and, at the input of every later layer, writes that layer's own P_i over the previous layer's outputs at
the prompt positions. The classifier still reads the CLS token at position 0; the model's output sequence is p
tokens longer: [CLS, prompts, patches]. Prompts start uniform in ±√(6 / (c·k_h·k_w + d)), Xavier over the patch
embedding's fan-in (c channels, k_h × k_w patches), as VPT's code. With p = 0 the model is the base.

Prompts are inputs, not weights: VPT does not merge. Rows route per adapter; rows whose prompt counts differ run as
separate passes (`core.tokens`, `core.length_buckets`).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ...core.config import TargetSpec, register_method
from ...core.delta import Delta
from ...core.targets import TargetError, block_list, match_targets, module_names, patch_projection
from ...core.tokens import TokenConfig, TokenDelta

AFTER_CLS = 1  # prompts go after the first token, the CLS token the classifier reads


@register_method
class VPT(TokenConfig):
    """VPT config: prompt count, shallow or deep, and where the patch embedding and the layers are."""

    method: ClassVar[str] = "vpt"
    targets: TargetSpec = Field(["embeddings"], description="the patch embedding module, whose output is [CLS, patches]")
    num_tokens: int = Field(10, ge=0, description="prompt tokens p (per layer when deep)")
    depth: Literal["shallow", "deep"] = Field("deep", description="prompts once after the patch embedding (shallow), "
                                                                  "or fresh ones at every layer's input (deep)")
    blocks: str | None = Field(None, description="deep: the ModuleList of transformer layers (default: the longest)")
    exclude: None = Field(None, description="none: VPT goes on the patch embedding and on whole layers")

    @model_validator(mode="after")
    def _blocks_only_deep(self) -> "VPT":
        if self.blocks is not None and self.depth == "shallow":
            raise ValueError("blocks names the layers deep prompts go into; shallow VPT uses none")
        return self

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Module,)

    def token_hosts(self, model: nn.Module) -> list[str]:
        """The patch embedding, then (deep) every layer after the first, whose input takes fresh prompts."""
        found = match_targets(model, self.targets)
        if len(found) != 1:
            raise TargetError(f"VPT targets must select the one patch embedding module; {self.targets!r} selects {found}")
        embedding = found[0]
        if patch_projection(model.get_submodule(embedding)) is None:
            raise TargetError(f"VPT inserts prompts after a vision transformer's patch embedding, but module "
                              f"{embedding!r} ({type(model.get_submodule(embedding)).__name__}) embeds no image "
                              "patches (it holds no Conv2d whose stride equals its kernel)")
        if self.depth == "shallow":
            return [embedding]
        blocks, count = block_list(model, self.blocks)
        order = module_names(model)
        if order.index(embedding) > order.index(f"{blocks}.0"):
            raise TargetError(f"the patch embedding {embedding!r} comes after the layers {blocks!r}")
        return [embedding, *(f"{blocks}.{i}" for i in range(1, count))]

    def build_all(self, hosts: dict[str, nn.Module]) -> Iterator[Delta]:
        """P_0 inserted into the patch embedding's output; P_i written over layer i's input positions (deep)."""
        projection = patch_projection(next(iter(hosts.values())))
        for i in range(len(hosts)):
            yield TokenDelta(initial_prompts(projection, self.num_tokens), at=AFTER_CLS, inserts=i == 0)


def initial_prompts(projection: nn.Conv2d, count: int) -> torch.Tensor:
    """[count, d] uniform in ±√(6 / (fan-in + d)), the patch embedding's fan-in c·k_h·k_w (float32)."""
    fan_in = projection.in_channels * math.prod(projection.kernel_size)
    bound = math.sqrt(6.0 / (fan_in + projection.out_channels))
    return torch.empty(count, projection.out_channels, device=projection.weight.device).uniform_(-bound, bound)
