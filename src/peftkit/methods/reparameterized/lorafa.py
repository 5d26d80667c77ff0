"""LoRA-FA: memory-efficient LoRA with a frozen down-projection (Zhang et al., 2023, arXiv:2308.03303).

    h = W0 x + s · B A x,   A random and frozen after init, only B trains

With A frozen, backward computes no gradient for A, so autograd does not keep A's input x
for it: a LoRA layer's activation memory shrinks from x (d_in wide) to A x (r wide), which
B's gradient needs. A is a buffer: saved and loaded with the adapter, never handed to an
optimizer, and `set_trainable` cannot unfreeze it. The rest (scaling, dropout, merge) is LoRA's.
PEFT has LoRA-FA only as an optimizer over a plain LoRA, so the PEFT export is a plain LoRA.
Hosts: Linear, Conv1D, Conv2d (an Embedding's LoRA starts with A = 0, which frozen stays useless).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field
from torch import nn

from ...core.config import register_method
from ...core.hosts import LINEAR_TYPES
from .lora import LoRA, LoRADelta


@register_method
class LoRAFA(LoRA):
    """LoRA config whose A stays at its random init (no PiSSA: its A is W0's, not random)."""

    method: ClassVar[str] = "lorafa"
    peft_type: ClassVar[str | None] = None  # PEFT "LORA" files load as plain LoRA, not as this
    init: Literal["zero", "gaussian"] = Field("zero", description="A kaiming-uniform (zero: B = 0) or gaussian")

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES + (nn.Conv2d,)

    def build(self, host: nn.Module) -> "LoRAFADelta":
        return LoRAFADelta(host, self)

    def to_peft(self) -> dict[str, Any]:
        return {**super().to_peft(), "peft_type": LoRA.peft_type}


class LoRAFADelta(LoRADelta):
    """LoRA's layer with A turned into a frozen buffer."""

    def __init__(self, host: nn.Module, config: LoRAFA):
        super().__init__(host, config)
        frozen = self.lora_A.detach()  # [r, in(, kh, kw)]
        del self.lora_A
        self.register_buffer("lora_A", frozen)
