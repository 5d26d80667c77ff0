"""Quantized bases (QLoRA): a model's Linear weights stored in 4 or 8 bits through bitsandbytes, frozen, with any
peftkit method trained on top.

    W ≈ code[q] · absmax_b                  4-bit (NF4 / FP4): q ∈ 0..15 per weight, one absmax per block of B weights
    absmax_b ≈ code8[q2_b] · c_g + offset   double quantization: the absmaxes 8-bit, in groups of 256 blocks
    W ≈ CB · SCB_row / 127                  int8: one scale per output row

The embedding tables are stored smaller too (`embeddings`: int8 by default, or bf16 / nf4 / kept float), and an
output head tied to one reads the same stored table (`efficient.bnb_embedding`).

Each quantized layer is a peftkit subclass of bitsandbytes' `Linear4bit` / `Linear8bitLt`, so it is an nn.Linear to
every method, and it implements `core.hosts.QuantizedHost`: deltas read its weight only as the dequantized float
tensor (DoRA's norm) and write it back only through `store_weight` (merging: dequantize → add ΔW → quantize again,
with the rounding that adds measured, `quantization_errors`). Unmerging puts back the exact stored weight from
before the merge (`core.hosts.RestorableHost`), so merge/unmerge cycles do not drift.

The forward is one path in training and evaluation alike: dequantize a block, multiply in float (bitsandbytes' CPU
inference path, which repacks the weight to bf16 scales and casts activations to bf16, is switched off: it would
make evaluation differ from training and the stored weight differ from what was saved).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ..core.atomic import write_dir_atomically
from ..core.io import read_json
from ..core.registry import REGISTRY_ATTR
from ..core.slot import is_delta_parameter
from ..core.targets import match_targets, own_modules

logger = logging.getLogger(__name__)

SCHEME_BITS: dict[str, int] = {"nf4": 4, "fp4": 4, "int8": 8}
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' blockwise kernels accept
COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                          "float16": torch.float16}
WEIGHTS_FILE = "quantized.safetensors"
CONFIG_FILE = "quantization.json"
FORMAT = "peftkit-quantized-base"


class QuantizeConfig(BaseModel):
    """How a base is quantized. Give `scheme`, `bits` or both: bits 4 alone means NF4, bits 8 means int8."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Literal["nf4", "fp4", "int8"] = "nf4"
    bits: Literal[4, 8] = 4
    double_quant: bool = Field(True, description="4-bit: quantize the block scales too (8-bit, groups of 256)")
    block_size: int = Field(64, description="4-bit: weights per scale")
    skip: str | list[str] = Field([], description="modules (and everything below them) left in full precision, "
                                                  "in the targets syntax: names, dotted suffixes, 'type:X', a regex")
    skip_head: bool = Field(True, description="leave the output layer alone (the LM head, a classification head)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="4-bit: the dtype the matmul runs in; None: fixed by the first input a layer sees "
                          "(bitsandbytes: float32 or bfloat16 from then on, float16: each input's own)")
    embeddings: Literal["int8", "bf16", "nf4", "keep"] = Field(
        "int8", description="how the embedding tables (and a head tied to one) are stored: int8 with one absmax per "
                            "row, bf16, nf4 in blocks along each row, or kept as they are")

    @model_validator(mode="before")
    @classmethod
    def _scheme_and_bits(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        scheme, bits = data.get("scheme"), data.get("bits")
        if scheme is None and bits is not None:
            data = {**data, "scheme": "int8" if bits == 8 else "nf4"}
        elif bits is None and scheme in SCHEME_BITS:
            data = {**data, "bits": SCHEME_BITS[scheme]}
        return data

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, value: int) -> int:
        if value not in BLOCK_SIZES:
            raise ValueError(f"block size {value} is not supported; use one of {', '.join(map(str, BLOCK_SIZES))}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "QuantizeConfig":
        if SCHEME_BITS[self.scheme] != self.bits:
            raise ValueError(f"bits: scheme {self.scheme} stores {SCHEME_BITS[self.scheme]} bits, not {self.bits}")
        if self.scheme == "int8":
            given = sorted({"block_size", "compute_dtype"} & self.model_fields_set)
            if "double_quant" in self.model_fields_set and self.double_quant:
                given.append("double_quant")
            if given:
                raise ValueError(f"{', '.join(given)}: int8 keeps one scale per row and computes in the input's "
                                 "dtype; these apply to the 4-bit schemes (nf4, fp4) only")
        return self

    @property
    def cache_key(self) -> str:
        """`name` plus a digest of every setting: one cache folder per distinct config."""
        digest = hashlib.sha1(self.model_dump_json().encode()).hexdigest()[:8]
        return f"{self.name}-{digest}"

    @property
    def name(self) -> str:
        """A short name for file names and reports: nf4-dq-b64, fp4-b128, int8."""
        linears = "int8" if self.scheme == "int8" else f"{self.scheme}{'-dq' if self.double_quant else ''}-b{self.block_size}"
        return linears if self.embeddings == "keep" else f"{linears}-emb-{self.embeddings}"


def quantize_config(value: "QuantizeConfig | str | int | dict[str, Any]") -> "QuantizeConfig":
    """A QuantizeConfig from its short forms: a scheme name ("nf4"), a bit count (4, 8), or a mapping of its fields."""
    if isinstance(value, QuantizeConfig):
        return value
    if isinstance(value, str):
        return QuantizeConfig(scheme=value)
    if isinstance(value, int) and not isinstance(value, bool):
        return QuantizeConfig(bits=value)
    if isinstance(value, dict):
        return QuantizeConfig(**value)
    raise TypeError(f"quantize must be a scheme name, a bit count or a mapping, not {type(value).__name__}")


@dataclass(frozen=True)
class QuantizationError:
    """How far a stored (quantized) weight is from the float weight it was asked to store."""

    max_abs: float
    relative_frobenius: float  # ‖Q(W) − W‖_F / ‖W‖_F

    @classmethod
    def between(cls, exact: torch.Tensor, stored: torch.Tensor) -> "QuantizationError":
        diff = (stored.float() - exact.float())
        norm = float(exact.float().norm())
        return cls(float(diff.abs().max()) if diff.numel() else 0.0, float(diff.norm()) / norm if norm else 0.0)


class QuantizedModule:
    """What the quantized Linear types (bitsandbytes' in `efficient.bnb_linear`, pure torch NF-k and grouped INT4 in
    `efficient.packed_linear`) and embedding tables (`efficient.bnb_embedding`) have: the QuantizedHost methods,
    exact restore, the rounding error of the last store, and their tensors for saving."""

    store_error: QuantizationError | None = None  # set by store_weight (a merge); None: the weight as quantized

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as float32 in the module's own layout: (out, in) for a Linear, (vocabulary, width) for a table."""
        raise NotImplementedError

    def _quantize(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def store_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` (in `dequantized_weight`'s layout) and keep it; remember how much the rounding changed it."""
        self._quantize(weight.detach())
        self.store_error = QuantizationError.between(weight, self.dequantized_weight())
        logger.debug("re-quantized %s: max abs error %.3g, relative Frobenius %.3g", type(self).__name__,
                     self.store_error.max_abs, self.store_error.relative_frobenius)

    def stored_state(self) -> tuple[Any, ...]:
        """The stored weight as it is (the objects themselves: a store replaces them rather than writing into them)."""
        raise NotImplementedError

    def restore_state(self, state: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the stored weight occupies (packed values and scales), by name: what is resident."""
        raise NotImplementedError



# --- which layers ---------------------------------------------------------------------------------


def head_names(model: nn.Module) -> set[str]:
    """The model's output layer: its output embeddings (an LM head) if it declares them, and its last Linear in
    model order (a classification head such as BERT's `classifier`), as transformers' bitsandbytes loader does."""
    modules = [(name, module) for name, module in own_modules(model) if name]
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = {name for name, module in modules if head is not None and module is head}
    linears = [name for name, module in modules if isinstance(module, nn.Linear)]
    return names | set(linears[-1:])


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """Parameter names by storage, for the storages more than one parameter name uses (tied weights)."""
    by_storage: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(param.untyped_storage().data_ptr(), []).append(name)
    return {ptr: names for ptr, names in by_storage.items() if len(names) > 1}


@dataclass(frozen=True)
class LayerPlan:
    """What `quantize` does to each module: the Linear layers and embedding tables it quantizes, the output heads
    tied to a quantized table ({head: table}), and {name: why not} for the Linear layers and tables left alone."""

    linears: list[str]
    embeddings: list[str]
    tied_heads: dict[str, str]
    skipped: dict[str, str]


def _skip_reason(name: str, module: nn.Module, plain: type[nn.Module], skipped_roots: set[str]) -> str | None:
    if any(name == root or name.startswith(root + ".") for root in skipped_roots):
        return "skip"
    if type(module) is not plain:
        return f"{type(module).__name__} is not a plain {plain.__module__.split('.')[0]}.{plain.__qualname__}"
    return None


def choose_layers(model: nn.Module, config: QuantizeConfig) -> LayerPlan:
    """Which modules to quantize. Only plain `nn.Linear` and `nn.Embedding` modules are: a subclass
    (MultiheadAttention's out_proj) may read its weight directly, which a packed weight would break. A Linear whose
    weight is tied to a table that is quantized becomes a head reading that table; tied to anything else, it is
    left alone (quantizing it would hold a second copy)."""
    skipped_roots = set(match_targets(model, config.skip)) if config.skip else set()
    heads = head_names(model) if config.skip_head else set()
    shared = {name: names for names in _shared_weights(model).values() for name in names}  # by parameter name
    modules = [(name, module) for name, module in own_modules(model) if name]
    embeddings, skipped = [], {}
    for name, module in modules:
        if config.embeddings == "keep" or not isinstance(module, nn.Embedding):
            continue
        why = _skip_reason(name, module, nn.Embedding, skipped_roots)
        if why is None and module.max_norm is not None:
            why = "max_norm renormalises the table in place"
        embeddings.append(name) if why is None else skipped.setdefault(name, why)
    chosen, tied_heads = [], {}
    for name, module in modules:
        if not isinstance(module, nn.Linear):
            continue
        why = _skip_reason(name, module, nn.Linear, skipped_roots)
        ties = [n for param in module._parameters for n in shared.get(f"{name}.{param}", [])
                if not n.startswith(name + ".")]
        if why is None and ties:
            if len(ties) == 1 and ties[0].endswith(".weight") and ties[0].removesuffix(".weight") in embeddings:
                tied_heads[name] = ties[0].removesuffix(".weight")
                continue
            why = f"weight tied to {', '.join(ties)}"
        if why is None and name in heads:
            why = "output head (skip_head)"
        chosen.append(name) if why is None else skipped.setdefault(name, why)
    return LayerPlan(chosen, embeddings, tied_heads, skipped)


# --- quantize -------------------------------------------------------------------------------------


@dataclass
class QuantizeReport:
    """What `quantize` did: the layers and tables quantized and left alone, the heads tied to a quantized table, and
    the model's resident bytes before and after."""

    config: QuantizeConfig
    quantized: list[str]  # Linear layers
    skipped: dict[str, str]  # name -> why
    bytes_before: int
    bytes_after: int
    embeddings: list[str]
    tied_heads: dict[str, str]  # head -> the table it reads

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before

    def __str__(self) -> str:
        skipped = ", ".join(f"{name} ({why})" for name, why in self.skipped.items()) or "none"
        tables = f" and {len(self.embeddings)} embedding tables" if self.embeddings else ""
        tied = "".join(f"; {head} reads the quantized {table}" for head, table in self.tied_heads.items())
        return (f"quantized {len(self.quantized)} Linear layers{tables} to {self.config.name}{tied}; resident weights "
                f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB ({self.ratio:.3f}x); "
                f"left in full precision: {skipped}")


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, buffers and quantization states, each storage counted once (tied weights,
    shared codebooks)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for module in model.modules() if isinstance(module, QuantizedModule)
                for t in module.state_tensors().values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def quantize(model: nn.Module, bits: int | None = None, scheme: str | None = None, double_quant: bool | None = None,
             block_size: int | None = None, skip: str | list[str] | None = None, skip_head: bool | None = None,
             compute_dtype: str | None = None, embeddings: str | None = None,
             config: QuantizeConfig | None = None) -> QuantizeReport:
    """Replace the model's Linear layers and embedding tables, in place, by frozen quantized ones, leaving an untied
    output head and `skip` in full precision. The arguments are `QuantizeConfig`'s, or give `config` alone; unset:
    NF4 with double quantization in blocks of 64, tables in int8. Quantize before attaching adapters. Returns what
    was quantized and the resident bytes."""
    given = {"bits": bits, "scheme": scheme, "double_quant": double_quant, "block_size": block_size,
             "skip": skip if skip is None or isinstance(skip, str) else list(skip), "skip_head": skip_head,
             "compute_dtype": compute_dtype, "embeddings": embeddings}
    given = {field: value for field, value in given.items() if value is not None}
    if config is None:
        config = QuantizeConfig(**given)
    elif given:
        raise ValueError(f"quantize takes a config or its fields, not both: {', '.join(given)} given beside config "
                         "(put them in the config)")
    if model.__dict__.get(REGISTRY_ATTR) is not None and model.__dict__[REGISTRY_ATTR].configs:
        raise ValueError("quantize the base before attaching adapters: this model already has adapters attached")
    from .bnb_embedding import TiedHead, quantized_embedding
    from .bnb_linear import quantized_linear

    plan = choose_layers(model, config)
    if not plan.linears and not plan.embeddings:  # tables alone: e.g. beside Linear layers already in grouped INT4
        raise ValueError(f"nothing to quantize: no plain Linear layer or embedding table (left alone: "
                         f"{plan.skipped or 'the model has neither'})")
    tables = {name: quantized_embedding(model.get_submodule(name), config) for name in plan.embeddings}  # may refuse
    before = resident_bytes(model)
    for name in plan.linears:
        model.set_submodule(name, quantized_linear(model.get_submodule(name), config))
    for name, table in tables.items():
        model.set_submodule(name, table)
    for head, table in plan.tied_heads.items():
        model.set_submodule(head, TiedHead(tables[table], model.get_submodule(head).bias))
    model.__dict__["peftkit_quantization"] = config
    return QuantizeReport(config, plan.linears, plan.skipped, before, resident_bytes(model), plan.embeddings,
                          plan.tied_heads)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedModule]:
    """The model's quantized Linear layers and embedding tables by name (a tied head is its table's)."""
    return {name: module for name, module in own_modules(model) if isinstance(module, QuantizedModule)}


def quantization_errors(model: nn.Module) -> dict[str, QuantizationError]:
    """For each quantized layer whose weight was rewritten (a merge folded into it): how far the re-quantized weight
    is from the exact float weight asked for. Layers holding their weight as first quantized are left out."""
    return {name: host.store_error for name, host in quantized_layers(model).items() if host.store_error is not None}


# --- the quantized base cache ---------------------------------------------------------------------


class QuantizedBaseError(ValueError):
    """A saved quantized base that cannot be read or does not fit the model it is loaded into."""


def _layer_scheme(host: QuantizedModule) -> str:
    return getattr(host.weight, "quant_type", None) or "int8"


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the quantized base to `directory` (replaced as a whole): `quantized.safetensors` holds every base tensor,
    the quantized layers as their packed values and quant states exactly as stored, tied tensors once; and
    `quantization.json` names the scheme of each quantized layer. Adapters are not saved (save them with
    `peftkit.save`); a merged adapter would be, so it must be unmerged first."""
    registry = model.__dict__.get(REGISTRY_ATTR)
    if registry is not None and registry.merged:
        raise ValueError(f"adapters {sorted(registry.merged)} are merged into the base weights: unmerge them before "
                         "saving the base")
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no quantized layer: quantize it first (efficient.quantize.quantize)")
    from .packed_linear import PackedLinear

    packed = [name for name, host in layers.items() if isinstance(host, PackedLinear)]
    if packed:
        raise ValueError(f"layers {packed[:5]} are NF-k / grouped INT4 layers (pure torch), which this bitsandbytes "
                         "base cache does not describe: save and load the model's state_dict instead")
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_by_storage: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, value in model.state_dict().items():
        if is_delta_parameter(key):
            continue
        where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if where in first_by_storage:
            tied[key] = first_by_storage[where]
        else:
            first_by_storage[where] = key
            tensors[key] = value.detach().contiguous()
    config = model.__dict__.get("peftkit_quantization")
    description = {"format": FORMAT, "layers": {name: _layer_scheme(host) for name, host in layers.items()
                                                if isinstance(host, nn.Linear)},
                   "embeddings": {name: host.FORMAT for name, host in layers.items() if isinstance(host, nn.Embedding)},
                   "tied_heads": _tied_heads(model), "tied": tied,
                   "config": config.model_dump(mode="json", exclude_defaults=True) if config is not None else None}
    directory = Path(directory)
    write_dir_atomically(directory, {CONFIG_FILE: description, WEIGHTS_FILE: tensors})
    return directory


def _tied_heads(model: nn.Module) -> dict[str, str]:
    """{head: the quantized table it reads} for the model's tied heads."""
    from .bnb_embedding import TiedHead

    names = {id(module): name for name, module in own_modules(model)}
    return {name: names[id(module.embedding)] for name, module in own_modules(model) if isinstance(module, TiedHead)}


def _read_saved(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    description_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for file in (description_file, weights_file):
        if not file.is_file():
            raise QuantizedBaseError(f"{directory} is not a saved quantized base: {file.name} is missing")
    description = read_json(description_file)
    if description.get("format") != FORMAT:
        raise QuantizedBaseError(f"{description_file} is not a peftkit quantized base (format "
                                 f"{description.get('format')!r}, expected {FORMAT!r})")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise QuantizedBaseError(f"{weights_file} is not a readable safetensors file: {err}") from None
    for alias, source in description["tied"].items():
        tensors[alias] = tensors[source]
    return description, tensors


def load_quantized(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a base saved by `save_quantized` into `model`, a float model of the same architecture (its weights are
    replaced; build it without initialising them where you can): the quantized layers take the saved packed values
    and quant states as they are, without quantizing anything. Returns the model."""
    from .bnb_embedding import EMBEDDING_TYPES, TiedHead
    from .bnb_linear import HOST_TYPES

    directory = Path(directory)
    description, tensors = _read_saved(directory)
    config = QuantizeConfig(**description["config"]) if description["config"] is not None else None
    modules = dict(own_modules(model))
    tables, heads = description.get("embeddings", {}), description.get("tied_heads", {})
    expected = [(name, nn.Linear) for name in [*description["layers"], *heads]] + [(name, nn.Embedding) for name in tables]
    for name, kind in expected:  # all checked before the model changes
        if not isinstance(modules.get(name), kind):
            found = f"a {type(modules[name]).__name__}" if name in modules else "not a module"
            raise QuantizedBaseError(f"{directory} does not fit this model: its quantized layer {name!r} is {found} "
                                     f"here, not a {kind.__name__}")
    for name, scheme in description["layers"].items():
        linear = modules[name]
        compute = {"compute_dtype": config.compute_dtype} if config and config.compute_dtype else {}
        layer_config = QuantizeConfig(scheme=scheme, **compute)  # block size and double quant: from the quant state
        host = HOST_TYPES[scheme](linear.in_features, linear.out_features, linear.bias is not None, layer_config)
        prefix = f"{name}."
        host.load_packed({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        if host.dequantized_weight().shape != linear.weight.shape:
            raise QuantizedBaseError(f"{directory}: layer {name!r} was saved with shape "
                                     f"{tuple(host.dequantized_weight().shape)}, this model's is {tuple(linear.weight.shape)}")
        if linear.bias is not None:
            host.bias = nn.Parameter(tensors[f"{name}.bias"], requires_grad=False)
        host.train(linear.training)
        model.set_submodule(name, host)
    for name, table_format in tables.items():
        embedding, prefix = modules[name], f"{name}."
        try:
            table = EMBEDDING_TYPES[table_format].from_saved(
                embedding, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        except ValueError as err:
            raise QuantizedBaseError(f"{directory}: embedding {name!r}: {err}") from None
        model.set_submodule(name, table)
    for name, table in heads.items():
        model.set_submodule(name, TiedHead(model.get_submodule(table), tensors.get(f"{name}.bias")))
    packed = [*description["layers"], *tables]
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(f"{n}.") for n in packed)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not any(k.startswith(f"{n}.") for n in packed)]
    if missing or unexpected:
        raise QuantizedBaseError(f"{directory} does not fit this model: missing {missing[:5]}, unexpected "
                                 f"{unexpected[:5]}")
    _tie(model, description["tied"])
    if config is not None:
        model.__dict__["peftkit_quantization"] = config
    return model


def _tie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make each saved alias parameter the very parameter it was tied to (a model built from its config may not
    tie them, which would hold a second copy)."""
    for alias, source in tied.items():
        owner_name, _, attr = alias.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(getattr(owner, attr, None), nn.Parameter):
            setattr(owner, attr, model.get_parameter(source))
