"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

    h = W0 x + s · B A x,   A ∈ R^{r×in}, B ∈ R^{out×r},   s = α/r  (rsLoRA: s = α/√r)

W0 stays frozen; only A and B train. With B = 0 at start the model is unchanged, and
ΔW = s·BA merges into W0 for zero-overhead inference. PiSSA (Meng et al., 2024) starts
A, B from the top-r singular triplets of W0 and leaves the residual in the base weight; LoftQ
(`peftkit.efficient.loftq`) puts a quantized W0 in the base and A, B from SVDs of what it lost.

Hosts: Linear (and GPT-2's Conv1D), Conv2d (A is a conv with W0's kernel, B a 1×1 conv),
Embedding (A is looked up by token id).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import nn

from ...core.config import AdapterConfig, register_method
from ...core.hf_peft import PEFT_RAW, PeftKeys
from ...core.bank import StackedBank
from ...core.delta import Delta, DeltaBank
from ...core.routing import RoutingPlan
from ...core.hosts import WEIGHT_HOST_TYPES, edited_weight, host_shape, read_weight, to_host_layout
from ...core.targets import TargetError, match_targets, module_names
from ...efficient.adapter_options import DropAndPrune
from ...efficient.loftq import LoftQOptions, loftq_start
from ..selective.mask import Mask
from ..selective.sparse import SPARSE_HOST_TYPES, SparseDelta
from .shared_input import SharedInputGroup, link_siblings

ABSOLUTE_BIAS = "absolute_bias"  # a PEFT file's trained bias (absolute), until `prepare_load` makes it a change
_BIAS_CHANGE = "bias_change"  # the LoRADelta attribute holding its host's bias change


def pattern_matches(key: str, name: str) -> bool:
    """PEFT's `get_pattern_key` test: the key, as a regex, matches the module name or a dotted suffix of it."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


@register_method
class LoRA(PeftKeys, DropAndPrune, AdapterConfig):
    """LoRA config: rank, scaling, dropout on the input of A, and the initialisation of A and B."""

    method: ClassVar[str] = "lora"
    r: int = Field(8, gt=0, description="rank of ΔW")
    alpha: float = Field(8.0, gt=0, description="scaling numerator: s = alpha/r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of A")
    rslora: bool = Field(False, description="rank-stabilised scaling s = alpha/sqrt(r)")
    init: Literal["zero", "gaussian", "pissa", "loftq"] = Field(
        "zero", description="zero-B (default), gaussian A, PiSSA, or LoftQ (a quantized base, options in `loftq`)")
    loftq: LoftQOptions | None = Field(None, description="init='loftq': bits, iterations, block size (default 4, 5, 64)")
    rank_pattern: dict[str, int] = Field({}, description="module-name regex -> rank, overriding r (PEFT's rule)")
    alpha_pattern: dict[str, float] = Field({}, description="module-name regex -> alpha, overriding alpha (PEFT's rule)")
    bias: Literal["none", "lora_only", "all"] = Field(
        "none", description="also train biases: of the LoRA hosts (lora_only) or of every module (all), as PEFT's bias")
    _lora_hosts: frozenset[str] | None = PrivateAttr(None)  # bias="all": which hosts get LoRA (set by choose_hosts)

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns_valid(cls, value: dict[str, float]) -> dict[str, float]:
        for key, number in value.items():
            try:
                re.compile(key)
            except re.error as err:
                raise ValueError(f"pattern {key!r} is not a valid regex: {err}") from None
            if number <= 0:
                raise ValueError(f"pattern {key!r} gives {number}; ranks and alphas must be positive")
        return value

    @model_validator(mode="after")
    def _pissa_is_plain(self) -> "LoRA":
        if self.init in ("pissa", "loftq") and self.bias != "none":
            raise ValueError(f"{self.init} init takes no bias training (bias must be 'none')")
        if self.loftq is not None and self.init != "loftq":
            raise ValueError(f"loftq options are for init='loftq', not init={self.init!r}")
        return self

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def for_module(self, name: str) -> "LoRA":
        """This config with the rank and alpha `rank_pattern` / `alpha_pattern` give module `name`.

        PEFT takes the first matching key in order, but writes (as peftkit does) its JSON with sorted keys:
        a module whose value would change with the order is a named error, not a silent change on saving."""
        values = {}
        for field, patterns in (("r", self.rank_pattern), ("alpha", self.alpha_pattern)):
            keys = [key for key in patterns if pattern_matches(key, name)]
            if len({patterns[key] for key in keys}) > 1 and keys[0] != min(keys):
                raise ValueError(f"{field} patterns {keys} all match module {name!r} with different values; the first "
                                 "wins, and saved files sort the keys: make the patterns disjoint")
            if keys:
                values[field] = patterns[keys[0]]
        return self.model_copy(update=values) if values else self

    def choose_hosts(self, model: nn.Module) -> list[str]:
        """The LoRA targets; with bias="all" also every other module with a bias (PEFT trains them all)."""
        targets = super().choose_hosts(model)
        if self.bias != "all":
            return targets
        copies = match_targets(model, self.modules_to_save) if self.modules_to_save else []
        modules = dict(model.named_modules())
        biased = [n for n in module_names(model) if isinstance(modules[n]._parameters.get("bias"), nn.Parameter)
                  and n not in targets and not any(n == c or n.startswith(f"{c}.") for c in copies)]
        wrong = [f"{n} ({type(modules[n]).__name__})" for n in biased if not isinstance(modules[n], SPARSE_HOST_TYPES)]
        if wrong:
            raise TargetError(f"bias='all' would train biases peftkit cannot adapt: {', '.join(wrong[:5])}")
        self._lora_hosts = frozenset(targets)
        chosen = set(targets) | set(biased)
        return [n for n in module_names(model) if n in chosen]

    def build_all(self, hosts: dict[str, nn.Module]) -> Iterator[Delta]:
        """One delta per host with its own rank and alpha; with bias="all", BitFit's bias change on the others."""
        for name, host in hosts.items():
            if self.bias == "all" and self._lora_hosts is not None and name not in self._lora_hosts:
                yield BiasChange(host)
                continue
            config = self.for_module(name)
            _check_rank(name, host, config.r)
            yield config.build(host)

    @property
    def rewrites_base(self) -> bool:
        return self.init in ("pissa", "loftq")

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return WEIGHT_HOST_TYPES

    def build(self, host: nn.Module) -> "LoRADelta":
        return LoRADelta(host, self)

    # --- Hugging Face PEFT interop -------------------------------------------------------
    peft_type: ClassVar[str] = "LORA"
    _PEFT_KEY: ClassVar[re.Pattern] = re.compile(r"(.*)\.lora_(?:embedding_)?([AB])(?:\.weight)?")
    _PEFT_TENSOR_PREFIX: ClassVar[str] = "lora_"
    # PEFT options that change the math; loading them as plain LoRA would give wrong outputs.
    _PEFT_UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "use_dora", "lora_bias", "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora",
        "use_bdlora", "alora_invocation_tokens",
    )
    peft_bias_modes: ClassVar[tuple[str, ...]] = ("none", "lora_only", "all")

    # Inits that leave W0 untouched; the others (pissa*, olora, corda, loftq, lora_ga) save factors for a rewritten base.
    _PEFT_BASE_PRESERVING_INITS: ClassVar[frozenset[str]] = frozenset({"gaussian", "orthogonal", "eva", "mica"})

    def to_peft(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type, "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": self.targets, "exclude_modules": self.exclude, "use_rslora": self.rslora,
            "init_lora_weights": True if self.init == "zero" else self.init, "bias": self.bias, "use_dora": False,
            "modules_to_save": self.modules_to_save or None, "task_type": None, "inference_mode": True,
            "rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern, "fan_in_fan_out": False,
        }

    @classmethod
    def from_peft(cls, peft: dict[str, Any], modules_to_save: list[str]) -> "LoRA":
        cls.check_peft_options(peft)
        init = peft.get("init_lora_weights", True)
        if isinstance(init, str) and init not in cls._PEFT_BASE_PRESERVING_INITS:
            raise ValueError(f"PEFT LoRA saved with init_lora_weights={init!r} needs its residual base model; "
                             "convert it to plain LoRA in PEFT first")
        return cls(r=peft["r"], alpha=peft.get("lora_alpha", 8), dropout=peft.get("lora_dropout", 0.0),
                   targets=peft["target_modules"], exclude=peft.get("exclude_modules"),
                   rslora=peft.get("use_rslora", False), modules_to_save=modules_to_save,
                   rank_pattern=peft.get("rank_pattern") or {}, alpha_pattern=peft.get("alpha_pattern") or {},
                   bias=peft.get("bias", "none"))

    @staticmethod
    def peft_tensor_name(tensor_name: str, host: nn.Module) -> str:
        if isinstance(host, nn.Embedding):
            return tensor_name.replace("lora_", "lora_embedding_")
        return f"{tensor_name}.weight"

    def pack_peft(self, tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        """Bias changes become PEFT's trained biases: absolute values, under `base_layer.bias` on a LoRA host."""
        out = {}
        for key, value in tensors.items():
            host_name, peft_name = _bias_key(key)
            if peft_name is None:
                out[key] = value
            else:
                base = read_weight(model.get_submodule(host_name), "bias").detach()
                out[f"{PEFT_RAW}{host_name}.{peft_name}"] = (base.float() + value.float()).to(base.dtype).cpu()
        return {}, out

    @classmethod
    def split_peft_bias(cls, key: str) -> tuple[str, str]:
        """(module, our tensor name) for a bias PEFT trained (bias='lora_only' / 'all'): `<module>.bias`."""
        return key.removesuffix(".bias"), ABSOLUTE_BIAS

    def saved_config(self) -> "LoRA":
        """PiSSA is saved as a plain rank-2r LoRA on the *original* W0 (see `LoRADelta.saved_tensors`); LoftQ as the
        plain LoRA it is on its quantized base (loading it needs that base: the file cannot hold W0 − Q)."""
        if self.init == "loftq":
            return self.model_copy(update={"init": "zero", "loftq": None})
        if self.init != "pissa":
            return self
        factor = math.sqrt(2) if self.rslora else 2.0  # keeps s unchanged at rank 2r
        return self.model_copy(update={
            "r": 2 * self.r, "alpha": self.alpha * factor, "init": "zero",
            "rank_pattern": {k: 2 * v for k, v in self.rank_pattern.items()},
            "alpha_pattern": {k: v * factor for k, v in self.alpha_pattern.items()}})


def _bias_key(key: str) -> tuple[str, str | None]:
    """(host, PEFT's name) for a saved bias change (`<host>.bias_change.bias.values` on a LoRA host,
    `<host>.bias.values` on a bias-only host), or (key, None) for any other tensor."""
    for suffix, peft_name in ((f".{_BIAS_CHANGE}.bias.values", "base_layer.bias"), (".bias.values", "bias")):
        if key.endswith(suffix):
            return key.removesuffix(suffix), peft_name
    return key, None


def _check_rank(name: str, host: nn.Module, r: int) -> None:
    """A rank above the host's min(out, in·kernel) adds parameters but no expressiveness: a config mistake."""
    shape = host_shape(host)
    limit = min(shape.out_features, shape.in_features * math.prod(shape.kernel_size or (1,)))
    if r > limit:
        raise ValueError(f"LoRA rank {r} exceeds min(out, in) = {limit} of this {type(host).__name__} "
                         f"{shape.in_features}->{shape.out_features}; lower r, or set its rank in rank_pattern")


def _take_absolute_bias(saved: dict[str, torch.Tensor], host: nn.Module, key: str) -> None:
    """A PEFT file's trained (absolute) bias as the change from this model's base bias, under `key`."""
    absolute = saved.pop(ABSOLUTE_BIAS, None)
    if absolute is not None:
        base = read_weight(host, "bias").detach()
        saved[key] = absolute.float() - base.float().cpu() if absolute.shape == base.shape else absolute


class BiasChange(SparseDelta):
    """BitFit's dense bias change on one host: PEFT's bias="all" on a module without LoRA."""

    def __init__(self, host: nn.Module):
        super().__init__(host, ("bias",), {"bias": Mask.whole()})
        self._host = (host,)  # a tuple, not a submodule: the base bias is the model's

    def prepare_load(self, saved: dict[str, torch.Tensor]) -> None:
        _take_absolute_bias(saved, self._host[0], "bias.values")
        super().prepare_load(saved)


class LoRADelta(Delta):
    """One LoRA pair on one host: increment(x) = s · B A dropout(x)."""

    def __init__(self, host: nn.Module, config: LoRA):
        super().__init__()
        shape = host_shape(host)
        r, self.kind, self.scaling = config.r, shape.kind, config.scaling
        kernel = shape.kernel_size or ()
        ones = (1,) * len(kernel)
        # Adapter weights stay float32 on a half-precision base (as in HF PEFT): AdamW on bf16 factors stalls.
        factory = {"dtype": torch.float32, "device": host.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, shape.in_features, *kernel, **factory))  # [r, in, (kh, kw)]
        self.lora_B = nn.Parameter(torch.zeros(shape.out_features, r, *ones, **factory))  # [out, r, (1, 1)]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.shared: SharedInputGroup | None = None  # set by `link_adapter` for siblings that share an input
        if self.kind == "conv2d":
            self._conv_args = {k: getattr(host, k) for k in ("stride", "padding", "dilation")}
            # non-zero padding modes pad explicitly (as Conv2d does), so the branch matches the merged weight
            self._pad = None if host.padding_mode == "zeros" else (host._reversed_padding_repeated_twice, host.padding_mode)
            if self._pad is not None:
                self._conv_args["padding"] = 0
        if self.kind == "embedding":
            self._embedding_args = {k: getattr(host, k) for k in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")}
        trains_bias = getattr(config, "bias", "none") != "none" and isinstance(getattr(host, "bias", None), nn.Parameter)
        self.bias_change = BiasChange(host) if trains_bias else None  # Δb (PEFT's bias="lora_only" / "all")
        self._initialise(host, config.init, config.loftq)

    @torch.no_grad()
    def _initialise(self, host: nn.Module, init: str, loftq: LoftQOptions | None = None) -> None:
        if init == "pissa":
            return self._pissa(host)
        if init == "loftq":
            return self._loftq(host, loftq)
        if self.kind == "embedding":  # A is looked up per token: zero A, random B (as in HF PEFT)
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.lora_A.shape[0])
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def _pissa(self, host: nn.Module) -> None:
        """A, B from the top-r SVD of W0 (split as √S on each side); W0 ← W0 − s·BA."""
        if self.kind not in ("linear", "conv1d"):
            raise ValueError(f"PiSSA init needs a linear host, got {self.kind}")
        r = self.lora_A.shape[0]
        weight = to_host_layout(host, read_weight(host).float())  # [out, in]
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = (s[:r] / self.scaling).sqrt()
        self.lora_A.copy_(root[:, None] * vh[:r])  # [r, in]
        self.lora_B.copy_(u[:, :r] * root[None, :])  # [out, r]
        self.register_buffer("pissa_A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("pissa_B0", self.lora_B.detach().clone(), persistent=False)
        self.unmerge_from(host)  # the base keeps only the residual
        self.rewrites_base = True

    def _loftq(self, host: nn.Module, options: LoftQOptions | None) -> None:
        """A, B from LoftQ's alternation; W0 ← dequant(Q), the original kept to put back on removal."""
        start = loftq_start(host, self.lora_A.shape[0], self.scaling, options or LoftQOptions())
        self.lora_A.copy_(start.a)
        self.lora_B.copy_(start.b)
        self.loftq_errors = (start.error, start.qlora_error)  # ‖W − (Q + s·BA)‖_F, and zero-init QLoRA's ‖W − Q(W)‖_F
        # a plain attribute, not a buffer: merges snapshot a delta's buffers, and this is a whole weight
        self.loftq_original: torch.Tensor | None = read_weight(host).detach().clone()
        with edited_weight(host) as weight:
            weight.copy_(to_host_layout(host, start.base))
        self.rewrites_base = True

    def restore_base(self, host: nn.Module) -> None:
        """Undo the init's change of W0: PiSSA's residual (W0 = W_res + s·B0A0), LoftQ's quantized copy."""
        with edited_weight(host) as weight:
            if getattr(self, "loftq_original", None) is not None:
                weight.copy_(self.loftq_original)
            else:
                weight += to_host_layout(host, (self.pissa_B0 @ self.pissa_A0).float() * self.scaling).to(weight.dtype)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """PiSSA's W_res + s·BA − W0 = s·[B, −B0][A; A0]: a rank-2r LoRA on the original base."""
        if "pissa_A0" not in self._buffers or not self.rewrites_base:
            return super().saved_tensors()
        return {
            "lora_A": torch.cat([self.lora_A, self.pissa_A0]).detach(),
            "lora_B": torch.cat([self.lora_B, -self.pissa_B0], dim=1).detach(),
        }

    def down_weight(self) -> torch.Tensor:
        return self.lora_A

    @classmethod
    def link_adapter(cls, deltas: dict[str, "LoRADelta"]) -> None:
        """Linear siblings of one parent (q, k, v) read one input: one down-projection matmul for all of them."""
        link_siblings({host: delta for host, delta in deltas.items() if delta.kind in ("linear", "conv1d")})

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            return F.embedding(x, self.lora_A.T, **self._embedding_args)
        x = x.to(self.lora_A.dtype)
        if self.kind == "conv2d":
            if self._pad is not None:
                x = F.pad(x, self._pad[0], mode=self._pad[1])
            return F.conv2d(self.dropout(x), self.lora_A, **self._conv_args)
        fuse = self.shared is not None and not (self.training and isinstance(self.dropout, nn.Dropout))
        if fuse:
            return self.shared.project(self, x)
        return F.linear(self.dropout(x), self.lora_A)

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        down = self._down(x)  # [..., r] (conv: [N, r, H', W'])
        if self.kind == "conv2d":
            out = F.conv2d(down, self.lora_B) * self.scaling
        else:
            out = F.linear(down, self.lora_B) * self.scaling
        return out if self.bias_change is None else self.bias_change.transform(x, out)  # + Δb

    def prepare_load(self, saved: dict[str, torch.Tensor]) -> None:
        if self.bias_change is not None:
            _take_absolute_bias(saved, self.bias_change._host[0], f"{_BIAS_CHANGE}.bias.values")

    def merge_into(self, host: nn.Module) -> None:
        super().merge_into(host)
        if self.bias_change is not None:
            self.bias_change.merge_into(host)

    def unmerge_from(self, host: nn.Module) -> None:
        super().unmerge_from(host)
        if self.bias_change is not None:
            self.bias_change.unmerge_from(host)

    def add_increment_(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out += s·(A x)Bᵀ as one GEMM accumulating into the host output: no output-sized
        temporary, no separate scaling multiply, no separate add (the three cost ~15% of a
        MiniLM forward with LoRA on every linear layer)."""
        if (not _plain_lora(type(self)) or self.kind not in ("linear", "conv1d") or out.dtype != self.lora_B.dtype
                or not out.is_contiguous() or self.bias_change is not None):
            return out.add_(self.increment(x))  # subclasses that change the math (AdaLoRA, DyLoRA, SoRA...) keep theirs
        down = self._down(x)  # [..., r]; may be a strided slice of the shared q/k/v projection
        out.view(-1, out.shape[-1]).addmm_(down.reshape(-1, down.shape[-1]), self.lora_B.t(), alpha=self.scaling)
        return out

    @classmethod
    def add_routed_batch_(cls, deltas: dict[str, "LoRADelta"], plan: RoutingPlan, x: torch.Tensor, out: torch.Tensor,
                          bank: DeltaBank | None) -> tuple[str, ...]:
        """Many adapters in one batch: each row picks its (A, s·B) from a stack and two batched matmuls run in the
        batch's own row order (no row gather, no index_add_). Without gradients the stack is the host's `LoRABank`,
        kept across passes; with them it is stacked afresh, so gradients reach every adapter's factors."""
        if not _plain_lora(cls) or not out.is_contiguous():
            return ()
        first = next(iter(deltas.values())).lora_A
        batched = {name: d for name, d in deltas.items() if d._stackable(first)}
        if not batched:
            return ()
        names = tuple(batched)
        if torch.is_grad_enabled():
            a, b = LoRABank.stacked(list(batched.values()))
            positions = torch.tensor([*range(1, len(names) + 1), 0], device=a.device)
        else:
            (a, b), positions = bank.lookup(batched)
        index = positions[plan.row_index(names).to(a.device)]  # rows of other adapters: the all-zero entry 0
        rows = x.shape[0]
        down = torch.bmm(x.reshape(rows, -1, x.shape[-1]).to(a.dtype), a.index_select(0, index).transpose(1, 2))
        up = b.index_select(0, index)  # [rows, R, out]
        if out.dtype == a.dtype:
            out.view(rows, -1, out.shape[-1]).baddbmm_(down, up)
        else:  # a half-precision base: the increment in the factors' precision, as the group loop adds it
            out.view(rows, -1, out.shape[-1]).add_(torch.bmm(down, up).to(out.dtype))
        return names

    @classmethod
    def new_bank(cls) -> "LoRABank":
        return LoRABank()

    def _stackable(self, like: torch.Tensor) -> bool:
        """Whether this delta is plain s·B·A·x on a linear host with factors like `like` (dtype, device)."""
        return (self.kind in ("linear", "conv1d") and self.bias_change is None
                and not (self.training and isinstance(self.dropout, nn.Dropout))
                and self.lora_A.dtype == like.dtype and self.lora_A.device == like.device)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_A.float(), self.lora_B.float()
        if self.kind == "conv2d":  # ΔW[o, i, kh, kw] = Σ_r B[o, r] A[r, i, kh, kw]
            return torch.einsum("or,rikl->oikl", b.flatten(1), a) * self.scaling
        return (b @ a) * self.scaling  # [out, in]


class LoRABank(StackedBank):
    """The LoRA factors of one host's adapters (`core.bank`): A [1 + n, R, in] and (s·B)ᵀ [1 + n, R, out], B rank-major
    so the up-projection reads each row's factor contiguously, every rank zero-padded to the largest, R (exact: the
    padded rows of A meet the padded rows of Bᵀ). Rewritten on another scaling too."""

    padded_dims = (0, 0)

    @staticmethod
    def entry(delta: LoRADelta) -> tuple[torch.Tensor, torch.Tensor]:
        return delta.lora_A, delta.lora_B.t() * delta.scaling

    @staticmethod
    def sources(delta: LoRADelta) -> tuple[torch.Tensor, torch.Tensor]:
        return delta.lora_A, delta.lora_B

    @staticmethod
    def settings(delta: LoRADelta) -> tuple[float]:
        return (delta.scaling,)

    @property
    def a(self) -> torch.Tensor | None:
        return None if self.stacks is None else self.stacks[0]

    @property
    def b(self) -> torch.Tensor | None:
        return None if self.stacks is None else self.stacks[1]


def _plain_lora(cls: type) -> bool:
    """True when a LoRADelta subclass computes plain s·B·A·x (the fused paths above are exact for it)."""
    return all(getattr(cls, m) is getattr(LoRADelta, m) for m in ("increment", "_down", "down_weight"))
