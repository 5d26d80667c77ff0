"""OFT: orthogonal fine-tuning (Qiu et al., 2023, arXiv:2306.07280), as HF PEFT ≥ 0.18 implements it (its OFT type).

    h = W0 (x R_bd) + b,   R_bd = diag(R_1, …, R_n),   R_i = Cayley(Q_i),   Q_i = −Q_iᵀ ∈ R^{k×k},   n·k = in

The host's input is rotated blockwise before the host runs (an input-transforming delta: the slot applies it in
the pre-forward hook, each routed row group with its own R; other deltas on the host read the input unrotated),
so the host computes x R_bd W0ᵀ, and merging folds it into the weight, W ← W R_bdᵀ (PEFT's Linear merge).
Each Q_i is stored as its upper triangle (`oft_R`, [n, k(k−1)/2]; one row shared by all blocks with
`block_share`). Cayley: exactly R = (I − Q)(I + Q)⁻¹ (a solve), or with `use_cayley_neumann` (PEFT's default)
PEFT's series R ≈ I + 2Q + 2Q² + … + 2Q^{m−2} + Q^{m−1} for m = `num_cayley_neumann_terms` (only approximately
orthogonal, so unmerge solves with R rather than multiplying by its transpose, and restores W to rounding).
`coft` (constrained OFT) projects each Q_i back into a Frobenius ball of radius eps/√n before use, in place
(as PEFT does). Q = 0 at start, so R = I and a fresh adapter is a no-op. `module_dropout`: in training, ⌊p·n⌋
random blocks (of n > 1) are replaced by I for the pass (PEFT's MultiplicativeDropoutLayer; PEFT 0.21.2 builds
it but does not call it, so training with p > 0 differs from PEFT's, and eval is the same).
Set either `r` (number of blocks; OFT(r=4) needs no oft_block_size=0, unlike PEFT) or `oft_block_size` k; one
that does not divide a host's in-features is a named error (PEFT silently picks a nearby divisor). Tensors and
fields as PEFT's OFTConfig.
Hosts: Linear, GPT-2 Conv1D (peftkit format only: PEFT has no such OFT layer). Not Conv2d: PEFT's Conv2d OFT
rotates overlapping unfolded patches and sums them back, so its forward is not its merge (nor the identity at start).
"""
from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from ...core.config import AdapterConfig, register_method
from ...core.delta import Delta, Placement
from ...core.hf_peft import PeftKeys
from ...core.hosts import LINEAR_TYPES, Conv1D, edited_weight, host_shape, read_weight, to_host_layout

# PEFT 0.18 changed the Cayley–Neumann series; files from older versions mean another rotation.
_PEFT_NEUMANN_SINCE = (0, 18)


@register_method
class OFT(PeftKeys, AdapterConfig):
    """OFT config: block count or size, the Cayley parameterisation, block sharing, COFT and module dropout."""

    method: ClassVar[str] = "oft"
    r: int = Field(0, ge=0, description="number of diagonal blocks per host (0: set by oft_block_size)")
    oft_block_size: int = Field(32, ge=0, description="block size k (0: set by r); n·k = the host's in-features")
    use_cayley_neumann: bool = Field(True, description="PEFT's Neumann series for the Cayley transform (else exact)")
    num_cayley_neumann_terms: int = Field(5, gt=0, description="terms of the Neumann series")
    block_share: bool = Field(False, description="one rotation shared by all blocks of a host")
    coft: bool = Field(False, description="constrained OFT: keep each Q within a ball of radius eps")
    eps: float = Field(6e-5, gt=0, description="COFT's radius (before the 1/sqrt(blocks) factor)")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="training: share of blocks set to I per pass")

    @model_validator(mode="before")
    @classmethod
    def _r_replaces_default_size(cls, data: Any) -> Any:
        """OFT(r=4) means 4 blocks: the default oft_block_size steps aside (PEFT wants oft_block_size=0 spelled out)."""
        if isinstance(data, dict) and data.get("r") and "oft_block_size" not in data:
            return {**data, "oft_block_size": 0}
        return data

    @model_validator(mode="after")
    def _one_size(self) -> "OFT":
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(f"set exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) to a positive "
                             "value (r blocks of oft_block_size features cover the host's input)")
        return self

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def build(self, host: nn.Module) -> "OFTDelta":
        return OFTDelta(host, self)

    # --- Hugging Face PEFT interop -------------------------------------------------------
    peft_type: ClassVar[str] = "OFT"
    _PEFT_KEY: ClassVar[re.Pattern] = re.compile(r"(.*)\.(oft_R)\.weight")
    _PEFT_FIELDS: ClassVar[tuple[str, ...]] = ("r", "oft_block_size", "use_cayley_neumann", "num_cayley_neumann_terms",
                                               "block_share", "coft", "eps", "module_dropout")

    def to_peft(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type, **{f: getattr(self, f) for f in self._PEFT_FIELDS},
            "target_modules": self.targets, "exclude_modules": self.exclude, "fan_in_fan_out": False, "bias": "none",
            "init_weights": True, "modules_to_save": self.modules_to_save or None, "task_type": None,
            "inference_mode": True, "peft_version": ".".join(map(str, _PEFT_NEUMANN_SINCE)) + ".0",  # the formula's
        }

    @classmethod
    def from_peft(cls, peft: dict[str, Any], modules_to_save: list[str]) -> "OFT":
        cls.check_peft_options(peft)  # init_weights only chooses the start, which the file's tensors replace
        version = re.match(r"(\d+)\.(\d+)", str(peft.get("peft_version") or "0.0"))
        if peft.get("use_cayley_neumann", True) and (not version or tuple(map(int, version.groups())) < _PEFT_NEUMANN_SINCE):
            raise ValueError(f"PEFT OFT option use_cayley_neumann=True from PEFT {peft.get('peft_version') or '< 0.18'} "
                             "is not supported: PEFT 0.18 changed that series (peftkit follows PEFT >= 0.18)")
        return cls(**{f: peft[f] for f in cls._PEFT_FIELDS if f in peft}, targets=peft["target_modules"],
                   exclude=peft.get("exclude_modules"), modules_to_save=modules_to_save)

    @staticmethod
    def peft_tensor_name(tensor_name: str, host: nn.Module) -> str:
        if Conv1D is not None and isinstance(host, Conv1D):
            raise ValueError("Hugging Face PEFT's OFT has no layer for GPT-2's Conv1D; save this adapter in peftkit format")
        return f"{tensor_name}.weight"


class OFTDelta(Delta):
    """Blockwise rotations of one host's input: transform_input(x) = x R_bd."""

    additive = False
    placement = Placement.INPUT

    def __init__(self, host: nn.Module, config: OFT):
        super().__init__()
        features = host_shape(host).in_features
        if config.r:
            if config.r > features or features % config.r:
                raise ValueError(f"OFT r={config.r} blocks do not divide the host's {features} input features")
            size = features // config.r
        else:
            size = config.oft_block_size
            if size > features or features % size:
                raise ValueError(f"OFT oft_block_size={size} does not divide the host's {features} input features")
        self.blocks, self.block_size, self.config = features // size, size, config
        stored = 1 if config.block_share else self.blocks
        # float32 on a half-precision base, as PEFT's; Q = 0 so R = I at start
        self.oft_R = nn.Parameter(torch.zeros(stored, size * (size - 1) // 2, dtype=torch.float32,
                                              device=host.weight.device))
        rows, cols = torch.triu_indices(size, size, 1, device=host.weight.device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def _skew(self, vec: torch.Tensor) -> torch.Tensor:
        q = vec.new_zeros(vec.shape[0], self.block_size, self.block_size)
        q[:, self.rows, self.cols] = vec
        return q - q.transpose(-2, -1)  # [stored, k, k]

    @torch.no_grad()
    def _project_(self) -> None:
        """COFT: each Q back into the ball ‖Q‖_F ≤ eps/√stored, in place (PEFT's `_project_batch`)."""
        q = self._skew(self.oft_R)
        eps = self.config.eps / self.oft_R.shape[0] ** 0.5
        norm = torch.linalg.matrix_norm(q, keepdim=True)
        q = torch.where(norm <= eps, q, eps * q / norm)
        self.oft_R.copy_(q[:, self.rows, self.cols])

    def rotations(self) -> torch.Tensor:
        """R_i for every block, [blocks, k, k] (shared: one, expanded)."""
        if self.config.coft:
            self._project_()
        q = self._skew(self.oft_R)
        eye = torch.eye(self.block_size, dtype=q.dtype, device=q.device).expand_as(q)
        if self.config.use_cayley_neumann:  # PEFT's series, term by term
            terms, r = self.config.num_cayley_neumann_terms, eye
            if terms > 1:
                r = r + 2 * q
            if terms > 2:
                power = q @ q
                r = r + 2 * power
                for _ in range(3, terms - 1):
                    power = power @ q
                    r = r + 2 * power
                r = r + power @ q
        else:
            r = torch.linalg.solve(eye + q, eye - q, left=False)  # (I − Q)(I + Q)⁻¹
        return r.expand(self.blocks, -1, -1)

    def _dropped(self, r: torch.Tensor) -> torch.Tensor:
        """Training with module_dropout: ⌊p·n⌋ random blocks become I for this pass (PEFT's layer)."""
        p, n = self.config.module_dropout, self.blocks
        if not (self.training and p > 0 and n > 1):
            return r
        mask = torch.zeros(n, device=r.device)
        mask[torch.randperm(n, device=r.device)[:int(p * n)]] = 1
        mask = mask.view(n, 1, 1).to(r.dtype)
        return (1 - mask) * r + mask * torch.eye(self.block_size, dtype=r.dtype, device=r.device)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        r = self._dropped(self.rotations())
        blocks = x.to(r.dtype).reshape(*x.shape[:-1], self.blocks, self.block_size)
        return torch.einsum("...nk,nkc->...nc", blocks, r).reshape(x.shape).to(x.dtype)  # x_i R_i per block

    def rotation_matrix(self) -> torch.Tensor:
        """R_bd, [in, in]: the host computes (x R_bd) W0ᵀ (PEFT's `get_delta_weight`)."""
        return torch.block_diag(*self.rotations())

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError("OFT multiplies the host weight (W ← W R_bdᵀ) rather than adding a ΔW; "
                                  "use merge_into / unmerge_from, or rotation_matrix()")

    def merge_refusal(self, host: nn.Module) -> str | None:
        with torch.no_grad():
            smallest = torch.linalg.svdvals(self.rotations()).min()
        if smallest < 1e-6:
            return f"a rotation block is singular (smallest singular value {float(smallest):.1e}), so unmerge could not undo it"
        return None

    def _blocks_of(self, host: nn.Module) -> torch.Tensor:
        weight = to_host_layout(host, read_weight(host).detach()).double()  # [out, in]
        return weight.reshape(weight.shape[0], self.blocks, self.block_size)  # [out, n, k]

    def _store(self, host: nn.Module, blocks: torch.Tensor) -> None:
        with edited_weight(host) as weight:
            weight.copy_(to_host_layout(host, blocks.reshape(blocks.shape[0], -1)))

    @torch.no_grad()
    def merge_into(self, host: nn.Module) -> None:
        """W ← W R_bdᵀ: block i of W's columns becomes W_i R_iᵀ (in float64)."""
        r = self.rotations().double()
        self._store(host, torch.einsum("onc,nkc->onk", self._blocks_of(host), r))

    @torch.no_grad()
    def unmerge_from(self, host: nn.Module) -> None:
        """W ← W R_bd⁻ᵀ, solving R_i W_iᵀ = W'_iᵀ (exact for an R that is only nearly orthogonal)."""
        r = self.rotations().double()
        merged = self._blocks_of(host).permute(1, 2, 0)  # [n, k, out]: W'_iᵀ
        self._store(host, torch.linalg.solve(r, merged).permute(2, 0, 1))  # W_iᵀ = R_i⁻¹ W'_iᵀ
