"""Deltas on the sequence (docs/design.md, place 3): virtual tokens before the input (prompt tuning,
P-tuning) or in every attention layer's keys and values (prefix tuning).

Such a delta sits in the slot of the root model (host name ""), so save, load, remove, summary and
parameter access work as for any delta, but the slot never applies it. Instead one pre-forward hook
on the root model rewrites the call, for the active sequence adapter or, under `peftkit.routed`,
per row (the rows' adapter names come from the same RoutingPlan the module deltas use):

- prompt rows: `input_ids` become `inputs_embeds` (the model's own input embeddings, so module
  deltas on the embedding still apply) with the row's virtual tokens in front;
- prefix rows: a `DynamicCache` holding each layer's prefix keys and values is passed as the model's cache
  argument (`past_key_values`; `cache` from transformers 5.24 on): the prefix is put in the cache once, and a
  generation step that continues a cache adds nothing and recomputes nothing;
- `attention_mask`, `position_ids`, `token_type_ids` (0 on virtual tokens) and token-level
  `labels` (-100 on virtual tokens) are extended to match.

A row's real tokens take positions n, n+1, ... after its n virtual tokens (for prefixes too, as
Hugging Face PEFT computes them: BERT offsets positions by the cache length, Llama by the cache
position), counting only unmasked tokens, so a left-padded row equals the same row unpadded. Numbers
follow the model's convention: RoBERTa-style learned positions start at padding_idx + 1 and give
pads padding_idx, as the model itself would number them.

Output layout when rows carry different numbers of virtual tokens (P = the batch's largest):
- causal models (any attention module with `is_causal`): [pads][row's virtual tokens][real tokens];
  the real tokens sit at the fixed offsets P..P+T-1 and the last token is last, where generation
  and sequence classification read it;
- encoders: [row's virtual tokens][real tokens][pads]; position 0 is the row's first token, where
  BERT's pooler reads, and row i's real tokens start at its own number of virtual tokens.
Pads are masked, so every row's outputs at its own tokens equal running that row alone.

A non-empty cache passed in is taken to be one this hook filled for the same rows (a generation
step): its virtual tokens are masked in again, nothing is recomputed. Only causal models continue.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from transformers import DynamicCache

from . import length_buckets
from .config import AdapterConfig
from .delta import Delta, Placement
from .registry import REGISTRY_ATTR, AdapterRegistry
from .slot import deltas_of

ROOT = ""  # the host name of a sequence delta: the whole model
IGNORE_INDEX = -100  # Hugging Face's label for positions without a loss
UNCACHED = "_peftkit_uncached"  # marks a prefix cache made for a call with use_cache=False


class SequenceError(ValueError):
    """A call that sequence adapters (prompts, prefixes) cannot serve as asked."""


class SequenceLengthError(SequenceError):
    """Virtual tokens plus the input need more positions than the model has."""


class SequenceConfig(AdapterConfig):
    """Fields of every sequence method: how many virtual tokens a row gets."""

    targets: Literal["sequence"] = Field("sequence", description="sequence deltas sit on the model's input, not on modules")
    num_virtual_tokens: int = Field(20, gt=0, description="virtual tokens per row (prompt length or prefix length)")

    # Hugging Face PEFT stores prompt-learning tensors on the PeftModel itself: `prompt_embeddings`
    # without a module path, and task-head copies under `base_model.` rather than `base_model.model.`.
    peft_prefix: ClassVar[str] = "base_model."
    peft_needs_task_type: ClassVar[bool] = True  # PEFT's model class (where virtual tokens go) follows the task
    peft_module_targets: ClassVar[bool] = False  # no target_modules: the virtual tokens sit on the model's input
    _PEFT_KEY: ClassVar[re.Pattern] = re.compile(r"()(prompt_embeddings)")

    @field_validator("exclude")
    @classmethod
    def _no_exclude(cls, value: Any) -> Any:
        if value:
            raise ValueError("sequence adapters act on the whole input and take no exclude")
        return value

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Module,)

    def choose_hosts(self, model: nn.Module) -> list[str]:
        input_embeddings(model)  # fail at attach, not at the first forward pass
        return [ROOT]

    def build_all(self, hosts: dict[str, nn.Module]) -> Iterator[Delta]:
        model = hosts[ROOT]
        yield self.build(model).to(input_embeddings(model).weight.device)  # float32, beside the model

    @staticmethod
    def peft_tensor_name(tensor_name: str, host: nn.Module) -> str:
        return tensor_name

    @classmethod
    def check_peft_submodules(cls, peft: dict[str, Any]) -> None:
        if (peft.get("num_transformer_submodules") or 1) != 1:
            raise ValueError(f"PEFT {peft['peft_type']} for encoder-decoder models (num_transformer_submodules="
                             f"{peft['num_transformer_submodules']}) is not supported by peftkit")

    def peft_common(self) -> dict[str, Any]:
        """PEFT fields every prompt-learning config shares; PEFT fills the model's sizes (None) itself."""
        return {"peft_type": self.peft_type, "num_virtual_tokens": self.num_virtual_tokens, "token_dim": None,
                "num_layers": None, "num_attention_heads": None, "num_transformer_submodules": 1,
                "modules_to_save": self.modules_to_save or None, "inference_mode": True}


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The model's token embedding layer (where prompts live), or a named error."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except NotImplementedError:
        embedding = None
    if not isinstance(embedding, nn.Embedding):
        raise SequenceError(f"{type(model).__name__} has no input embeddings (get_input_embeddings()), which prompt "
                            "and prefix adapters need to turn token ids into vectors and to place virtual tokens")
    return embedding


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of the model's attention, as PEFT reads them from its config."""
    config = _text_config(model)
    try:
        layers, heads, hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    except AttributeError as err:
        raise SequenceError(f"prefix tuning needs a transformers config with the attention sizes ({err})") from None
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def _max_positions(model: nn.Module) -> int | None:
    config = _text_config(model)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _is_causal(model: nn.Module) -> bool:
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def _position_numbering(model: nn.Module) -> tuple[int, int]:
    """(first position, pad position) of the model's position ids: RoBERTa-style learned positions (an
    embedding with a padding_idx) number tokens from padding_idx + 1 and give pads padding_idx; others from 0."""
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None:
            return module.padding_idx + 1, module.padding_idx
    return 0, 0


class SequenceDelta(Delta):
    """Virtual tokens of one adapter: a prompt (`kind = "prompt"`) or per-layer key/value prefixes ("prefix")."""

    additive = False
    placement = Placement.SEQUENCE
    kind: ClassVar[Literal["prompt", "prefix"]]

    def __init__(self, model: nn.Module, config: SequenceConfig):
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.causal = _is_causal(model)
        self.first_position, self.pad_position = _position_numbering(model)
        if not any(hook is _rewrite_call for hook in model._forward_pre_hooks.values()):
            model.register_forward_pre_hook(_rewrite_call, with_kwargs=True)
        if not self.causal:
            length_buckets.install(model)

    reads_rows: bool = False  # a prefix that depends on its row's input (UniPELT's gate): `row_virtual`

    def virtual(self) -> torch.Tensor:
        """Prompt: [P, d] embeddings. Prefix: [P, layers, 2 (key, value), kv heads, head size]."""
        raise NotImplementedError

    def row_virtual(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[rows, P, ...]: the prefixes of rows whose input embeddings are `embeds` [rows, T, d], `mask` [rows, T]
        marking their real tokens (only a delta with `reads_rows`)."""
        raise NotImplementedError

    @staticmethod
    def read_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        return None  # the slot never applies a sequence delta, so it reads nothing from the call

    def merge_refusal(self, host: nn.Module) -> str | None:
        return "virtual tokens are extra inputs, not a weight"


# --- the call rewrite ----------------------------------------------------------------------------------------------

def _sequence_deltas(model: nn.Module) -> dict[str, SequenceDelta]:
    return {n: d for n, d in deltas_of(model).items() if d.placement is Placement.SEQUENCE}


def _row_deltas(registry: AdapterRegistry, deltas: dict[str, SequenceDelta], batch: int) -> list[SequenceDelta | None]:
    """Each row's sequence delta (None: none), from the routing plan or the active adapters."""
    plan = registry.plan
    if plan is not None:
        try:
            plan = plan.for_rows(batch, "the model")
        except ValueError as err:
            raise SequenceError(str(err)) from None
        return [deltas.get(name) if name is not None else None for name in plan.row_adapters]
    active = [name for name in registry.active if name in deltas]
    if len(active) > 1:
        raise SequenceError(f"adapters {active} both add virtual tokens; activate one of them, or route rows to each")
    return [deltas[active[0]] if active else None] * batch


def cache_argument(model: nn.Module) -> str:
    """The name of the model's key/value cache argument: `cache` from transformers 5.24 on, `past_key_values` before."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    """The parameters of the model class's forward, without `self` (the instance's may be `core.length_buckets`')."""
    return dict(list(inspect.signature(type(model).forward).parameters.items())[1:])


def _bind(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call as keyword arguments only (positional ones named by the forward signature)."""
    names = [n for n, p in _forward_parameters(model).items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise SequenceError(f"{type(model).__name__}.forward got {len(args)} positional arguments; pass inputs by name")
    return {**dict(zip(names, args)), **kwargs}


class _Layout:
    """Where every row's virtual and real tokens go in the rewritten batch (see the module docstring)."""

    def __init__(self, rows: list[SequenceDelta | None], model_facts: SequenceDelta, device: torch.device):
        self.rows, self.causal, self.device = rows, model_facts.causal, device
        self.first_position, self.pad_position = model_facts.first_position, model_facts.pad_position
        count = lambda kind: torch.tensor([d.num_virtual_tokens if d is not None and d.kind == kind else 0 for d in rows],
                                          device=device)
        self.prompt_len, self.prefix_len = count("prompt"), count("prefix")
        self.prompt_width, self.prefix_width = int(self.prompt_len.max()), int(self.prefix_len.max())
        members: dict[SequenceDelta, list[int]] = {}
        for row, delta in enumerate(rows):
            if delta is not None:
                members.setdefault(delta, []).append(row)
        self.groups = {d: torch.tensor(r, device=device) for d, r in members.items()}  # each delta once, with its rows
        slots = torch.arange(self.prompt_width, device=device)
        # a prompt slot's virtual token index (negative: unused); prompts are right-aligned in causal models
        self.prompt_index = slots - (self.prompt_width - self.prompt_len[:, None]) if self.causal else slots.expand(len(rows), -1)
        self.prompt_mask = (self.prompt_index >= 0) & (self.prompt_index < self.prompt_len[:, None])
        self.prefix_mask = torch.arange(self.prefix_width, device=device) >= self.prefix_width - self.prefix_len[:, None]

    def slot_range(self, delta: SequenceDelta) -> slice:
        """The prompt slots this delta's rows use."""
        n = delta.num_virtual_tokens
        return slice(self.prompt_width - n, self.prompt_width) if self.causal else slice(0, n)

    def stream(self, virtual: torch.Tensor, real: torch.Tensor, fill: float) -> torch.Tensor:
        """[B, P + T, ...]: the prompt slots and the real tokens in this layout (pads get `fill`)."""
        if self.causal:
            return torch.cat([virtual, real], 1)
        batch, length = real.shape[:2]
        pad = real.new_full((batch, 1, *real.shape[2:]), fill)
        source = torch.cat([virtual, real, pad], 1)
        t = torch.arange(self.prompt_width + length, device=self.device).expand(batch, -1)
        p = self.prompt_len[:, None]
        index = torch.where(t < p, t, torch.where(t < p + length, self.prompt_width + t - p, self.prompt_width + length))
        return source.gather(1, index.view(*index.shape, *[1] * (real.dim() - 2)).expand(-1, -1, *real.shape[2:]))

    def prompts(self, like: torch.Tensor) -> torch.Tensor:
        """[B, P, d]: each row's prompt in its slots, zeros elsewhere; each delta's prompt computed once."""
        out = like.new_zeros(len(self.rows), self.prompt_width, like.shape[-1])
        for delta, rows in self.groups.items():
            if delta.kind == "prompt":
                out[rows, self.slot_range(delta)] = delta.virtual().to(like.dtype)
        return out

    def fill_prefix_cache(self, cache: DynamicCache, model: nn.Module, dtype: torch.dtype,
                          rows_input: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put each layer's prefix keys and values in the (empty) cache, right-aligned in `prefix_width` slots;
        `rows_input(rows)`: those rows' (input embeddings, mask), for a prefix that reads them."""
        layers, heads, head_dim = kv_geometry(model)
        kv = torch.zeros(len(self.rows), self.prefix_width, layers, 2, heads, head_dim, dtype=dtype, device=self.device)
        for delta, rows in self.groups.items():
            if delta.kind == "prefix":
                virtual = delta.row_virtual(*rows_input(rows)) if delta.reads_rows else delta.virtual()
                kv[rows, self.prefix_width - delta.num_virtual_tokens:] = virtual.to(dtype)
        kv = kv.permute(2, 3, 0, 4, 1, 5)  # [layers, 2, B, heads, P, head size]
        for layer in range(layers):
            cache.update(kv[layer, 0], kv[layer, 1], layer)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting unmasked tokens only (pads get 0), as `generate` computes them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0) * mask.long()


def _rewrite_call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    deltas = _sequence_deltas(model)
    registry: AdapterRegistry | None = model.__dict__.get(REGISTRY_ATTR)
    if not deltas or registry is None:  # the last sequence adapter is gone: remove this hook
        for key, hook in list(model._forward_pre_hooks.items()):
            if hook is _rewrite_call:
                del model._forward_pre_hooks[key]
                model._forward_pre_hooks_with_kwargs.pop(key, None)
        return None
    if registry.disabled or registry.caller_places_virtual_tokens:
        return None
    call = _bind(model, args, kwargs)
    ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    x = embeds if ids is None else ids
    if x is None:
        raise SequenceError("prompt and prefix adapters need input_ids or inputs_embeds in the model call")
    rows = _row_deltas(registry, deltas, x.shape[0])
    if all(d is None for d in rows) or length_buckets.row_buckets(model, call) is not None:
        return None  # nothing to add, or the forward runs one pass per prompt length (each call rewritten then)
    layout = _Layout(rows, next(iter(deltas.values())), x.device)
    past = call.get(cache_argument(model))
    if getattr(past, UNCACHED, False):  # our own prefix cache, handed back by `generate(use_cache=False)`: drop it
        past = call[cache_argument(model)] = None
    cached = past.get_seq_length() if past is not None else 0
    if cached and not layout.causal:
        raise SequenceError("continuing a key/value cache with prompt or prefix adapters needs a causal model")
    _extend(model, call, layout, cached, x.shape[1])
    return (), call


def _extend(model: nn.Module, call: dict[str, Any], layout: _Layout, cached: int, length: int) -> None:
    """Rewrite `call` in place for `layout`; a continued cache (`cached` > 0 entries) already holds the virtual tokens."""
    mask = call.get("attention_mask")
    batch, device = len(layout.rows), layout.device
    if mask is None:  # all tokens so far are real: those in the cache after the virtual ones, and the new ones
        seen = cached - layout.prefix_width - layout.prompt_width if cached else 0
        mask = torch.ones(batch, seen + length, dtype=torch.long, device=device)
    elif mask.dim() != 2:
        raise SequenceError(f"prompt and prefix adapters extend a 2-D attention_mask [batch, length], not one of "
                            f"shape {tuple(mask.shape)}")
    offset = (layout.prompt_len + layout.prefix_len)[:, None]
    given = call.get("position_ids")  # in the model's numbering; counted from 0 below
    real_positions = (given.expand(batch, -1) - layout.first_position if given is not None
                      else _positions(mask)[:, -length:]) + offset
    prefix_mask = layout.prefix_mask.to(mask.dtype)
    if cached:
        call["attention_mask"] = torch.cat([prefix_mask, layout.prompt_mask.to(mask.dtype), mask], 1)
        call["position_ids"] = real_positions + layout.first_position
    else:
        if layout.prompt_width:
            mask, real_positions = _insert_prompts(model, call, layout, mask, real_positions, length)
        if layout.prefix_width:
            _insert_prefixes(model, call, layout, mask)
        call["attention_mask"] = torch.cat([prefix_mask, mask], 1)
        call["position_ids"] = torch.where(mask > 0, real_positions + layout.first_position, layout.pad_position)
    _check_positions(model, call["position_ids"], layout)


def _insert_prompts(model: nn.Module, call: dict[str, Any], layout: _Layout, mask: torch.Tensor,
                    positions: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings, token types and labels with the prompt slots; returns the mask and positions likewise."""
    if call.get("inputs_embeds") is None:
        call["inputs_embeds"] = input_embeddings(model)(call["input_ids"])
    call["input_ids"] = None
    embeds = call["inputs_embeds"]
    call["inputs_embeds"] = layout.stream(layout.prompts(embeds), embeds, 0.0)
    for key, fill in (("token_type_ids", 0), ("labels", IGNORE_INDEX)):
        value = call.get(key)
        if value is not None and value.dim() >= 2 and value.shape[1] == length:  # token-level, not one per row
            call[key] = layout.stream(value.new_full((len(layout.rows), layout.prompt_width), fill), value, fill)
    return (layout.stream(layout.prompt_mask.to(mask.dtype), mask, 0),
            layout.stream(layout.prompt_index.clamp(min=0), positions, 0))


def _insert_prefixes(model: nn.Module, call: dict[str, Any], layout: _Layout, mask: torch.Tensor) -> None:
    """The prefix keys and values in the call's (empty) cache, or in a new one; `mask`: the real tokens."""
    cache = call.get(cache_argument(model))
    if cache is None:
        cache = call[cache_argument(model)] = DynamicCache()
        # the model returns the cache it was given; one made for a call without caching must not be continued
        setattr(cache, UNCACHED, call.get("use_cache") is False)
    embeds = call.get("inputs_embeds")

    def rows_input(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows_embeds = input_embeddings(model)(call["input_ids"][rows]) if embeds is None else embeds[rows]
        return rows_embeds, mask[rows]

    layout.fill_prefix_cache(cache, model, input_embeddings(model).weight.dtype if embeds is None else embeds.dtype,
                             rows_input)


def _check_positions(model: nn.Module, positions: torch.Tensor, layout: _Layout) -> None:
    limit = _max_positions(model)
    needed = int(positions.max()) + 1 if positions.numel() else 0
    if limit is not None and needed > limit:
        virtual = int((layout.prompt_len + layout.prefix_len).max())
        raise SequenceLengthError(f"{virtual} virtual tokens plus the input need {needed} positions but the model has "
                                  f"{limit} (max_position_embeddings); shorten the input or use fewer virtual tokens")
