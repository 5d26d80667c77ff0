"""LLaMA-Adapter: zero-initialised attention over learned adaption prompts (Zhang et al., 2023, arXiv:2303.16199).

    h ← h + W_o · g · softmax(R(W_q x) (W_k P)ᵀ / √d_head) (W_v P)      (per head; g = 0 at start)

In each of the top `adapter_layers` attention layers, `adapter_len` learned prompt vectors P are
projected by the layer's own key and value projections and attended by the layer's rotary-embedded
queries R(W_q x), in a softmax of their own; the result passes the layer's output projection and
is added to the attention output through a learned gate g. The gate starts at zero, so training
starts exactly at the base model's outputs. The prompt keys carry no position, so the adapter does
not enter the KV cache: cached and uncached generation agree. Like Hugging Face PEFT's "adaption
prompt" (whose tensors `adaption_prompt` (1, L, hidden) and `adaption_gate` (1,) these are), the gate
is one scalar per layer and the prompt starts at N(0, 1). The queries, keys and values use the
base projections, W_o without its bias (PEFT adds the bias of a biased W_o a second time, so there
a zero gate is no longer the base model). Not mergeable: the softmax depends on the input.

Hosts: Llama-family attention modules (Llama, SmolLM2, Mistral, Qwen2): exactly q_proj, k_proj,
v_proj and o_proj, called with rotary `position_embeddings`. Anything else is refused by name.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...core.config import AdapterConfig, TargetSpec, register_method
from ...core.delta import Delta
from ...core.hf_peft import PeftKeys
from ...core.slot import host_children
from ...core.targets import TYPE_PREFIX

_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})


class UnsupportedAttentionError(ValueError):
    """A module LLaMA-Adapter cannot sit on: not a Llama-family attention layer."""


@register_method
class LlamaAdapter(PeftKeys, AdapterConfig):
    """LLaMA-Adapter config: prompt length and how many attention layers, counted from the top, get one."""

    method: ClassVar[str] = "llama_adapter"
    targets: TargetSpec = ["self_attn"]
    adapter_len: int = Field(10, gt=0, description="number of adaption prompt vectors per layer")
    adapter_layers: int = Field(gt=0, description="adapt the last this many of the targeted attention layers")

    def host_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Module,)  # the attention's structure is checked by the delta, with a precise message

    def choose_hosts(self, model: nn.Module) -> list[str]:
        names = super().choose_hosts(model)
        if len(names) < self.adapter_layers:
            raise ValueError(f"adapter_layers={self.adapter_layers} but targets {self.targets!r} match only "
                             f"{len(names)} attention modules")
        return names[-self.adapter_layers:]

    def build(self, host: nn.Module) -> "LlamaAdapterDelta":
        return LlamaAdapterDelta(host, self.adapter_len)

    # --- Hugging Face PEFT interop (peft_type ADAPTION_PROMPT) -------------------------------
    peft_type: ClassVar[str] = "ADAPTION_PROMPT"
    peft_module_targets: ClassVar[bool] = False  # PEFT's own rule (last adapter_layers by attribute name): `choose_hosts`
    _PEFT_KEY: ClassVar[re.Pattern] = re.compile(r"(.*)\.(adaption_prompt|adaption_gate)")

    def to_peft(self) -> dict[str, Any]:
        """PEFT names the attention modules by one attribute name and keeps the last `adapter_layers` of them."""
        targets = self.targets
        if (not isinstance(targets, list) or len(targets) != 1 or "." in targets[0]
                or targets[0].startswith(TYPE_PREFIX) or self.exclude):
            raise ValueError(f"PEFT's adaption prompt selects attention modules by one attribute name (like "
                             f"['self_attn']); targets {targets!r} with exclude {self.exclude!r} cannot be saved for it")
        if self.modules_to_save:
            raise ValueError("PEFT's adaption prompt config has no modules_to_save; save this adapter in peftkit format")
        return {"peft_type": self.peft_type, "target_modules": targets[0], "adapter_len": self.adapter_len,
                "adapter_layers": self.adapter_layers, "task_type": "CAUSAL_LM", "inference_mode": True}

    @classmethod
    def from_peft(cls, peft: dict[str, Any], modules_to_save: list[str]) -> "LlamaAdapter":
        cls.check_peft_options(peft)
        hosts = peft["target_modules"]  # the modules holding tensors; PEFT chose them by attribute name
        leaves = {host.rpartition(".")[2] for host in hosts}
        if len(leaves) != 1 or len(hosts) != peft["adapter_layers"]:
            raise ValueError(f"the PEFT adaption prompt holds tensors for {hosts}, which are not the last "
                             f"adapter_layers={peft['adapter_layers']} modules of one attribute name")
        return cls(targets=sorted(leaves), adapter_len=peft["adapter_len"], adapter_layers=peft["adapter_layers"],
                   modules_to_save=modules_to_save)

    @staticmethod
    def peft_tensor_name(tensor_name: str, host: nn.Module) -> str:
        return tensor_name


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAdapterDelta(Delta):
    """Adaption prompts and their gate on one attention module; additive on its output."""

    reads_base = True  # the prompts go through the layer's own q/k/v/o weights: merging into them would move it

    def __init__(self, host: nn.Module, adapter_len: int):
        super().__init__()
        _check_attention(host)
        self._host = (host,)  # a tuple, not a submodule: the projections belong to the base model
        self.head_dim = host.head_dim
        self.hidden = host.q_proj.in_features
        self.heads = host.q_proj.out_features // self.head_dim
        self.kv_heads = host.k_proj.out_features // self.head_dim
        factory = {"dtype": torch.float32, "device": host.q_proj.weight.device}  # float32 on a half-precision base
        self.adaption_prompt = nn.Parameter(torch.randn(1, adapter_len, self.hidden, **factory))  # N(0, 1) as PEFT
        self.adaption_gate = nn.Parameter(torch.zeros(1, **factory))

    @staticmethod
    def read_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The attention's input with its rotary cos and sin appended: [batch, tokens, hidden + 2·head_dim]."""
        hidden = args[0] if args else kwargs["hidden_states"]
        position = args[1] if len(args) > 1 else kwargs.get("position_embeddings")
        if position is None:
            raise UnsupportedAttentionError("LLaMA-Adapter needs the rotary position embeddings a Llama-family "
                                            "attention module is called with (position_embeddings=(cos, sin))")
        cos, sin = position
        shape = (*hidden.shape[:-1], cos.shape[-1])  # cos, sin may be shared by all rows: give each row its own
        return torch.cat([hidden, cos.expand(shape).to(hidden.dtype), sin.expand(shape).to(hidden.dtype)], dim=-1)

    def _prompt_heads(self, projection: nn.Linear) -> torch.Tensor:
        """The prompt through a key or value projection, per query head: [heads, adapter_len, head_dim]."""
        projected = F.linear(self.adaption_prompt[0].to(projection.weight.dtype), projection.weight, projection.bias)
        per_kv_head = projected.view(-1, self.kv_heads, self.head_dim).transpose(0, 1)
        return per_kv_head.repeat_interleave(self.heads // self.kv_heads, dim=0)  # grouped-query attention

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        host = self._host[0]
        if x.shape[-1] != self.hidden + 2 * self.head_dim:
            raise UnsupportedAttentionError(f"LLaMA-Adapter needs rotary embeddings over the whole head ({self.head_dim}); "
                                            f"this attention got {(x.shape[-1] - self.hidden) // 2}")
        hidden, cos, sin = x.split([self.hidden, self.head_dim, self.head_dim], dim=-1)
        rows, tokens = hidden.shape[:2]
        query = F.linear(hidden, host.q_proj.weight, host.q_proj.bias).view(rows, tokens, self.heads, self.head_dim)
        query = query.transpose(1, 2)  # [rows, heads, tokens, head_dim]
        query = query * cos.unsqueeze(1) + _rotate_half(query) * sin.unsqueeze(1)
        scores = query @ self._prompt_heads(host.k_proj).transpose(1, 2) / self.head_dim ** 0.5
        weights = (self.adaption_gate * torch.softmax(scores.float(), dim=-1)).to(query.dtype)
        mixed = (weights @ self._prompt_heads(host.v_proj)).transpose(1, 2).reshape(rows, tokens, -1)
        return F.linear(mixed, host.o_proj.weight)

    def merge_refusal(self, host: nn.Module) -> str | None:
        return "the prompt attention depends on the input, so it has no weight delta"


def _check_attention(host: nn.Module) -> None:
    children = set(host_children(host))
    head_dim = getattr(host, "head_dim", None)
    problem = None
    if children != _PROJECTIONS or not all(isinstance(getattr(host, n), nn.Linear) for n in _PROJECTIONS):
        problem = f"its submodules are {sorted(children)}, not exactly the Linear layers {sorted(_PROJECTIONS)}"
    elif not isinstance(head_dim, int) or host.q_proj.out_features % head_dim or host.k_proj.out_features % head_dim:
        problem = f"its head_dim {head_dim!r} does not divide the query and key widths"
    elif abs(getattr(host, "scaling", head_dim ** -0.5) - head_dim ** -0.5) > 1e-12:
        problem = f"it scales attention scores by {host.scaling}, not 1/sqrt(head_dim)"
    if problem:
        raise UnsupportedAttentionError(f"LLaMA-Adapter supports Llama-family attention (Llama, Mistral, Qwen2); "
                                        f"{type(host).__name__} is not one: {problem}")
