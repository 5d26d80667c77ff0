"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2024, arXiv:2310.11454).

    h = W0 x + Λ_b B Λ_d A x,   A ∈ R^{r×in}, B ∈ R^{out×r} frozen random and shared by all layers,  Λ = diag

Only the vectors d ∈ R^r (init `d_initial`) and b ∈ R^{out} (init 0, so a fresh adapter is a
no-op) train, per layer. A and B are drawn once per adapter from `projection_prng_key`, exactly
as HF PEFT draws them (Kaiming-uniform from a CPU generator, sized for the largest in and out
among the hosts), and each layer uses the top-left slice it needs. They are regenerated, never
stored in peftkit's format; the PEFT format carries them (`base_model.vera_A/vera_B`) and loading
one checks they are the ones the key gives. ΔW = Λ_b B Λ_d A merges into W0.

Hosts: Linear and GPT-2's Conv1D.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ...core.config import AdapterConfig, register_method
from ...core.hf_peft import PeftKeys
from ...core.delta import Delta
from ...core.hosts import LINEAR_TYPES, host_shape


def projections(seed: int, r: int, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]): PEFT's `_init_vera_A_vera_B`, bit for bit (same generator, order and bounds)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shared = []
    for shape in ((r, in_features), (out_features, r)):
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))  # Kaiming-uniform, gain √2, fan_in = shape[1]
        shared.append(torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator))
    return shared[0], shared[1]


def _largest(hosts: Iterable[nn.Module]) -> tuple[int, int]:
    """(out, in): the largest output and input sizes among the hosts, which the shared A, B must cover."""
    shapes = [host_shape(host) for host in hosts]
    return max(s.out_features for s in shapes), max(s.in_features for s in shapes)


@register_method
class VeRA(PeftKeys, AdapterConfig):
    """VeRA config: the rank of the shared projections, their seed, and d's initial value."""

    method: ClassVar[str] = "vera"
    r: int = Field(256, gt=0, description="rank of the shared random projections A, B")
    d_initial: float = Field(0.1, allow_inf_nan=False, description="initial value of every entry of d")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of A")
    projection_prng_key: int = Field(0, ge=0, lt=2**64, description="seed of the shared A and B")

    @field_validator("d_initial")
    @classmethod
    def _d_not_zero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("d_initial must be non-zero: with b = 0 too, neither d nor b would ever get a gradient")
        return value

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def build_all(self, hosts: dict[str, nn.Module]) -> Iterator["VeRADelta"]:
        """The first delta holds A and B for every host (sized to cover all); the others slice them."""
        shape, owner = _largest(hosts.values()), None
        for host in hosts.values():
            delta = VeRADelta(host, self, owner, shape)
            owner = delta if owner is None else owner
            yield delta

    def build(self, host: nn.Module) -> "VeRADelta":
        return VeRADelta(host, self, None, _largest([host]))

    # --- Hugging Face PEFT interop -------------------------------------------------------
    peft_type: ClassVar[str] = "VERA"
    _PEFT_KEY: ClassVar[re.Pattern] = re.compile(r"(.*)\.(vera_lambda_[bd])")

    def to_peft(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type, "r": self.r, "target_modules": self.targets, "vera_dropout": self.dropout,
            "d_initial": self.d_initial, "projection_prng_key": self.projection_prng_key, "save_projection": True,
            "modules_to_save": self.modules_to_save or None, "bias": "none", "fan_in_fan_out": False,
            "init_weights": True, "layers_to_transform": None, "layers_pattern": None, "task_type": None,
            "inference_mode": True,
        }

    @classmethod
    def from_peft(cls, peft: dict[str, Any], modules_to_save: list[str]) -> "VeRA":
        cls.check_peft_options(peft)
        return cls(r=peft["r"], targets=peft["target_modules"], d_initial=peft.get("d_initial", 0.1),
                   dropout=peft.get("vera_dropout", 0.0), projection_prng_key=peft.get("projection_prng_key", 0),
                   modules_to_save=modules_to_save)

    @staticmethod
    def peft_tensor_name(tensor_name: str, host: nn.Module) -> str:
        return tensor_name


    def peft_shared_tensors(self, hosts: list[nn.Module]) -> dict[str, torch.Tensor]:
        """PEFT's model-level `vera_A`, `vera_B` (written with save_projection=True, PEFT's default)."""
        a, b = projections(self.projection_prng_key, self.r, *_largest(hosts))
        return {"vera_A": a, "vera_B": b}

    def check_peft_shared(self, tensors: dict[str, torch.Tensor]) -> None:
        """A PEFT file's projections must be those the key regenerates: peftkit keeps only the key."""
        a, b = tensors.get("vera_A"), tensors.get("vera_B")
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        well_formed = set(shapes) == {"vera_A", "vera_B"} and a.dim() == b.dim() == 2
        if not well_formed or a.shape[0] != self.r or b.shape[1] != self.r:
            raise ValueError(f"PEFT VeRA file: expected vera_A [r, in], vera_B [out, r] with r={self.r}; got {shapes}")
        want_a, want_b = projections(self.projection_prng_key, self.r, b.shape[0], a.shape[1])
        if not (torch.equal(a, want_a.to(a.dtype)) and torch.equal(b, want_b.to(b.dtype))):
            raise ValueError(f"PEFT VeRA file: vera_A/vera_B differ from the projections projection_prng_key="
                             f"{self.projection_prng_key} gives here (peftkit regenerates them from the key)")


class VeRADelta(Delta):
    """One VeRA layer: increment(x) = b ⊙ B (d ⊙ A dropout(x)), A and B sliced from the owner's shared pair."""

    def __init__(self, host: nn.Module, config: VeRA, owner: VeRADelta | None, shape: tuple[int, int]):
        super().__init__()
        sizes = host_shape(host)
        self.in_features, self.out_features = sizes.in_features, sizes.out_features
        device = host.weight.device
        if owner is None:  # non-persistent: regenerated from the seed, never saved
            a, b = projections(config.projection_prng_key, config.r, *shape)
            self.register_buffer("vera_A", a.to(device), persistent=False)  # [r, in_max]
            self.register_buffer("vera_B", b.to(device), persistent=False)  # [out_max, r]
        # A tuple, not an attribute torch would register: the owner's buffers follow it across devices.
        self._owner = (owner or self,)
        factory = {"dtype": torch.float32, "device": device}  # float32 on a half-precision base, as LoRA's factors
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), config.d_initial, **factory))  # [r]: d
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **factory))  # [out]: b
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared pair: A [r, in], B [out, r]."""
        owner = self._owner[0]
        return owner.vera_A[:, :self.in_features], owner.vera_B[:self.out_features]

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.projections()
        down = F.linear(self.dropout(x.to(self.vera_lambda_d.dtype)), a)  # [..., r]: A x
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * down, b)  # [..., out]

    def delta_weight(self) -> torch.Tensor:
        a, b = self.projections()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)  # [out, in]
