"""LST: Ladder Side-Tuning (Sung et al., 2022, arXiv:2206.06522).

    z_0 = D_0(h_0)                                              (h_0: the first layer's input, the embeddings)
    z_i = g_i(μ_i · D_i(h_i) + (1 − μ_i) · z_{i−1}),   μ_i = σ(α_i / T)      i = 1..L
    h_L ← U(z_L)                                                (what the head reads)

A small side network g_1..g_L, the backbone's own layers narrowed r times (hidden, feed-forward and head sizes ÷ r,
the same number of heads), reads the frozen backbone's layer outputs h_i through ladders: a down-projection D_i and a
learned gate μ_i (α_i = 0 at start, T = 0.1). Its last output, projected up by U, replaces the backbone's last
hidden state, so the head reads it. The side layers start from the backbone's weights, structurally pruned as in the
paper: each weight keeps the rows and the columns with the largest L1 norms (a bias the rows of its weight, a norm's
scale its largest entries), in their original order; D_i and U start random, like the paper's.

Nothing is trained inside the backbone and nothing the backbone computes needs a gradient, so autograd records none
of its operations: the backward pass runs through the side network and the ladders only, and the backbone keeps no
activations for it, which is where LST saves memory. The ladders read detached outputs, so this holds beside other
adapters too.

Hosts: the layers of one stack, consecutive and ending with its last layer (default: every layer), each a BERT-style
encoder layer (`attention.self.query/key/value`, `intermediate`, `output`: BERT, RoBERTa, MiniLM) or a Llama-style
decoder layer (`self_attn.q/k/v/o_proj`, `mlp`: Llama, SmolLM2, Mistral, Qwen2), with eager or SDPA attention. A
side decoder layer's rotary embedding uses every r-th frequency of the backbone's (its own head size's frequencies).
The side network keeps no KV cache: generate with `use_cache=False`. Under per-row routing each adapter's side
network runs on its own rows; rows of other adapters keep the backbone's output. Not mergeable.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field, PrivateAttr
from torch import nn

from ...core.config import AdapterConfig, TargetSpec, register_method
from ...core.delta import Delta
from ...core.hosts import read_weight
from ...core.slot import host_children
from ...core.targets import layer_number

ENCODER, DECODER = "encoder", "decoder"
ATTENTION_KINDS = ("eager", "sdpa")
ATTENTION_DROPOUT = {ENCODER: "attention_probs_dropout_prob", DECODER: "attention_dropout"}  # the configs' names


class UnsupportedBackboneError(ValueError):
    """A model LST cannot build a side network for."""


@register_method
class LST(AdapterConfig):
    """Ladder side-tuning config: the reduction factor of the side network and the gates' temperature."""

    method: ClassVar[str] = "lst"
    not_checkpointable: ClassVar[str | None] = (
        "its backbone runs without gradients, so there is nothing to recompute, and a recomputed backbone layer would "
        "feed its ladder a second time")
    targets: TargetSpec = Field(r".*(encoder\.layer|layers)\.\d+", description="the backbone layers the ladders "
                                "read: consecutive, ending with the last layer (default: all of them)")
    reduction: int = Field(8, gt=1, description="r: the side network's widths are the backbone's ÷ r")
    gate_temperature: float = Field(0.1, gt=0, description="T in the ladder gates μ_i = σ(α_i / T)")
    attention_dropout: float | None = Field(0.0, ge=0, lt=1, description="dropout on the side layers' attention "
                                            "probabilities; None: the backbone's. At 0 (the default), fused "
                                            "attention keeps no attention map for the backward pass: half the step's "
                                            "peak tensors on MiniLM, and better accuracy in docs/memory.md's run")
    _backbone: Any = PrivateAttr(None)  # (hidden size, layer family, side config): set by choose_hosts

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Module,)  # the layers' structure is checked in choose_hosts, with a precise message

    def choose_hosts(self, model: nn.Module) -> list[str]:
        names = super().choose_hosts(model)
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "hidden_size"):
            raise UnsupportedBackboneError(f"LST builds its side network from a transformers model's config; "
                                           f"{type(model).__name__} has none")
        if getattr(config, "_attn_implementation", "eager") not in ATTENTION_KINDS:
            raise UnsupportedBackboneError(f"LST's side layers take the backbone's attention mask as eager or SDPA "
                                           f"attention does; this model uses {config._attn_implementation!r}")
        _check_stack(model, names)
        family = {_family(model.get_submodule(name)) for name in names}.pop()  # one stack: one layer class
        side = _side_config(config, family, self.reduction)
        if self.attention_dropout is not None:
            setattr(side, ATTENTION_DROPOUT[family], self.attention_dropout)
        self._backbone = (config.hidden_size, family, side)
        return names

    def build_all(self, hosts: dict[str, nn.Module]) -> Any:
        """One ladder per layer, sharing the side network's running state; the first also projects the embeddings
        in, the last projects the result out."""
        if self._backbone is None:
            raise RuntimeError("choose_hosts(model) must run before build_all")
        # kept no longer than this: configs compare with their private state
        (hidden, family, side_config), self._backbone = self._backbone, None
        state = SideState()
        last = len(hosts) - 1
        for index, host in enumerate(hosts.values()):
            kind = LadderInputDelta if index == 0 else LadderDelta
            yield kind(host, index, index == last, family, side_config, hidden, self.gate_temperature, state)


def _check_stack(model: nn.Module, names: list[str]) -> None:
    """The hosts are consecutive layers of one ModuleList, the last of them its last layer (the head reads it)."""
    parents = {name.rpartition(".")[0] for name in names}
    if len(parents) != 1:
        raise UnsupportedBackboneError(f"LST's targets must be layers of one stack; they fall in {sorted(parents)}")
    parent = parents.pop()
    stack = model.get_submodule(parent)
    numbers = [layer_number(name.rpartition(".")[2]) for name in names]
    if not isinstance(stack, nn.ModuleList) or None in numbers:
        raise UnsupportedBackboneError(f"LST's targets must be the numbered layers of a ModuleList; {names[0]} is not")
    if numbers != list(range(numbers[0], len(stack))):
        raise UnsupportedBackboneError(f"LST's targets must be consecutive layers ending with the last one "
                                       f"({parent}.{len(stack) - 1}), whose output the head reads; got layers {numbers}")


def _family(layer: nn.Module) -> str:
    """ENCODER for a BERT-style layer, DECODER for a Llama-style one; anything else is refused by name."""
    children = set(host_children(layer))
    attention = getattr(layer, "attention", None)
    if {"attention", "intermediate", "output"} <= children and all(
            isinstance(getattr(getattr(attention, "self", None), n, None), nn.Linear) for n in ("query", "key", "value")):
        if "crossattention" in children:
            raise UnsupportedBackboneError("LST supports encoder layers without cross-attention")
        return ENCODER
    attention = getattr(layer, "self_attn", None)
    if {"self_attn", "mlp"} <= children and all(
            isinstance(getattr(attention, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return DECODER
    raise UnsupportedBackboneError(
        f"LST builds its side layers from the backbone's own layer class: a BERT-style encoder layer (attention.self."
        f"query/key/value, intermediate, output) or a Llama-style decoder layer (self_attn.q/k/v/o_proj, mlp); "
        f"{type(layer).__name__} (children {sorted(children)}) is neither")


def _side_config(config: Any, family: str, r: int) -> Any:
    """The backbone's config with hidden, feed-forward and head sizes divided by r (the same number of heads)."""
    side = copy.deepcopy(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    sizes = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size, "head size": head_dim}
    if family == DECODER:
        sizes["head size"] = 2 * head_dim  # rotary pairs: the side's head size must stay even
    uneven = [f"{what} {size}" for what, size in sizes.items() if size % r]
    if uneven or (family == ENCODER and config.hidden_size % (r * heads)):
        raise UnsupportedBackboneError(f"reduction {r} does not divide the backbone's {', '.join(uneven) or 'head size'} "
                                       f"({heads} heads); choose a reduction that does")
    side.hidden_size, side.intermediate_size = config.hidden_size // r, config.intermediate_size // r
    if family == DECODER:
        side.head_dim = head_dim // r
    return side


@dataclass(eq=False)
class SideState:
    """The side network's running state during one forward pass, shared by one adapter's ladders."""

    z: torch.Tensor | None = None  # the side network's current hidden state
    mask: torch.Tensor | None = None  # additive attention mask of the side layers (None: the backbone had none)
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # the side layers' cos, sin
    next_layer: int = 0


class LadderDelta(Delta):
    """One side layer g_i with its ladder (D_i, α_i) on backbone layer i; the last also holds U."""

    additive = False
    reads_input = False  # only the first ladder reads its layer's input (the embeddings)

    def __init__(self, host: nn.Module, index: int, last: bool, family: str, side_config: Any, hidden: int,
                 temperature: float, state: SideState):
        super().__init__()
        self.index, self.last, self.family, self.temperature = index, last, family, temperature
        self.hidden = hidden
        self._state = state  # plain attribute: shared with the adapter's other ladders, not a submodule
        device = next(host.parameters()).device
        width = side_config.hidden_size
        self.side = type(host)(side_config, layer_idx=index).to(device=device, dtype=torch.float32)
        _prune_into(self.side, host)
        self.down = nn.Linear(hidden, width, device=device)
        self.gate = nn.Parameter(torch.zeros(1, device=device))  # α_i = 0: μ_i = 1/2
        self.up = nn.Linear(width, hidden, device=device) if last else None

    def transform(self, x: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        state = self._state
        if state.next_layer != self.index or state.z is None or state.z.shape[0] != out.shape[0]:
            raise RuntimeError(f"LST's side network expected layer {state.next_layer} with its rows next, but layer "
                               f"{self.index} ran on {out.shape[0]} rows: the backbone's layers must run in order, "
                               "once each, on the same rows")
        mu = torch.sigmoid(self.gate / self.temperature)
        mixed = mu * self.down(out.detach().to(self.down.weight.dtype)) + (1 - mu) * state.z
        state.z = self._side_layer(mixed, state)
        state.next_layer += 1
        if not self.last:
            return out
        z = state.z
        state.z, state.mask, state.rotary, state.next_layer = None, None, None, 0  # nothing kept past the pass
        return self.up(z).to(out.dtype)

    def _side_layer(self, z: torch.Tensor, state: SideState) -> torch.Tensor:
        if self.family == ENCODER:
            out = self.side(z, state.mask)
        else:
            out = self.side(z, attention_mask=state.mask, position_embeddings=state.rotary)
        return out[0] if isinstance(out, tuple) else out


class LadderInputDelta(LadderDelta):
    """The first ladder: it also reads its layer's input (h_0, the attention mask, the rotary embedding) and starts
    the side network with z_0 = D_0(h_0)."""

    reads_input = True

    def __init__(self, host: nn.Module, index: int, last: bool, family: str, side_config: Any, hidden: int,
                 temperature: float, state: SideState):
        super().__init__(host, index, last, family, side_config, hidden, temperature, state)
        self.down_input = nn.Linear(hidden, side_config.hidden_size, device=self.down.weight.device)
        self.rotary_dim = host.self_attn.head_dim if family == DECODER else 0  # the backbone's cos / sin width

    @staticmethod
    def read_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The layer's input with what every side layer needs appended, one row per batch row (so routing can
        gather it): [hidden | cos | sin (a decoder's rotary) | additive attention mask over the keys (if any)]."""
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("past_key_values")  # read after the layer ran: it holds this call's tokens already
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > hidden.shape[1]:
            raise UnsupportedBackboneError("LST's side network keeps no KV cache: generate with use_cache=False")
        parts = [hidden]
        rotary = kwargs.get("position_embeddings")
        if rotary is not None:
            shape = (*hidden.shape[:-1], rotary[0].shape[-1])
            parts += [rotary[0].expand(shape).to(hidden.dtype), rotary[1].expand(shape).to(hidden.dtype)]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is not None:
            mask = mask.expand(hidden.shape[0], -1, hidden.shape[1], -1)[:, 0]
            low = torch.finfo(hidden.dtype).min
            parts.append(torch.where(mask, 0.0, low).to(hidden.dtype) if mask.dtype == torch.bool
                         else mask.clamp(min=low).to(hidden.dtype))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else hidden

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        state = self._state
        hidden, rest = x[..., :self.hidden], x[..., self.hidden:]
        if self.family == DECODER:
            cos, sin, rest = rest.split([self.rotary_dim, self.rotary_dim, rest.shape[-1] - 2 * self.rotary_dim], -1)
            width = self.side.self_attn.head_dim
            state.rotary = (_side_rotary(cos, width), _side_rotary(sin, width))
        state.mask = rest.unsqueeze(1).to(self.down.weight.dtype) if rest.shape[-1] else None
        state.z = self.down_input(hidden.detach().to(self.down_input.weight.dtype))
        state.next_layer = self.index
        return super().transform(x, out)


def _side_rotary(table: torch.Tensor, width: int) -> torch.Tensor:
    """A rotary cos or sin table for heads of `width` from the backbone's (rotate-half layout, frequencies θ^(−2j/d)):
    head size d/r uses frequencies θ^(−2j·r/d), the backbone's every r-th."""
    half = table[..., :table.shape[-1] // 2]
    chosen = half[..., ::table.shape[-1] // width]
    return torch.cat([chosen, chosen], dim=-1).float()


@torch.no_grad()
def _prune_into(side: nn.Module, layer: nn.Module) -> None:
    """Each side parameter from the backbone parameter of the same name: the rows and columns of largest L1 norm
    (a bias takes the rows its weight kept, a 1-D scale its largest entries), in their original order."""
    for name, param in side.named_parameters():
        owner, _, leaf = name.rpartition(".")
        module = layer.get_submodule(owner)
        source = read_weight(module, leaf).detach().float()  # a quantized weight, dequantized
        ranked = read_weight(module).detach().float() if leaf == "bias" else source
        pruned = source
        for dim, size in enumerate(param.shape):
            if source.shape[dim] != size:
                pruned = pruned.index_select(dim, _largest(ranked, dim, size))
        param.copy_(pruned)


def _largest(weight: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Indices along `dim` of the `size` slices with the largest L1 norms, in ascending order."""
    others = [d for d in range(weight.dim()) if d != dim]
    norms = weight.abs().sum(others) if others else weight.abs()
    return norms.topk(size).indices.sort().values
