"""Shared pieces of the serving tests: a tiny random Llama with SmolLM2's real tokenizer, adapters of several
methods on it (random, so each changes the outputs), and each request's solo `generate` reference."""
from __future__ import annotations

import functools

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
import peftkit.serve
from peftkit import IA3, Bottleneck, LoRA, PrefixTuning, PromptTuning
from peftkit.models import load_smollm2

METHODS = {
    "lora": LoRA(r=4, targets=["q_proj", "v_proj"]),
    "lora-all": LoRA(r=8, alpha=4, targets="all-linear", exclude=["lm_head"]),
    "ia3": IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
    "prefix": PrefixTuning(num_virtual_tokens=5),
    "prompt": PromptTuning(num_virtual_tokens=3),
    "bottleneck": Bottleneck.preset("pfeiffer"),
}


@functools.cache
def smollm2_tokenizer():
    return load_smollm2()[1]


def tiny_llama(seed: int = 0, context: int = 512) -> LlamaForCausalLM:
    """A 2-layer random Llama over SmolLM2's vocabulary (its tokenizer gives real text in and out)."""
    tokenizer = smollm2_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=context,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


def randomize(model: torch.nn.Module, name: str, std: float = 0.3) -> None:
    """Non-zero adapter weights, so the adapter visibly changes the model's outputs."""
    with torch.no_grad():
        for parameter in peftkit.adapter_parameters(model, name):
            parameter.normal_(0, std)


def with_adapters(model: torch.nn.Module, names: list[str] | None = None) -> torch.nn.Module:
    for name in names or list(METHODS):  # "ia3-2": another (IA)3 adapter
        config = METHODS[name] if name in METHODS else METHODS[name.rsplit("-", 1)[0]]
        peftkit.attach(model, config, name=name, activate=False)
        randomize(model, name)
    return model


def solo(model: torch.nn.Module, ids: list[int], adapter: str | None, max_tokens: int) -> list[int]:
    """Greedy tokens of `generate` run alone with one adapter (or the bare base), stopping at EOS."""
    x = torch.tensor([ids])
    with torch.no_grad():
        if adapter is None:
            with peftkit.disabled(model):
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False)
        else:
            peftkit.activate(model, adapter)
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False)
    tokens = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


class ReadyStore:
    """The store interface with every adapter already attached (the engine tests do not need loading)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def check(self, name: str) -> None:
        if name not in peftkit.adapters(self.model):
            raise peftkit.serve.UnknownAdapter(f"no adapter named {name!r}")

    def prepare(self, wanted: set[str], in_use: set[str]) -> None:
        return None

    def release(self, wanted: set[str], in_use: set[str]) -> None:
        return None

    def state(self, name: str) -> str:
        return "ready"

    def failure(self, name: str) -> str | None:
        return None

    def wait_reads(self, names: set[str], timeout: float) -> None:
        return None

    def virtual_tokens(self, name: str) -> int:
        return getattr(peftkit.adapters(self.model)[name], "num_virtual_tokens", 0)


class LoadingStore(ReadyStore):
    """Adapters that never finish loading: their requests wait in the queue."""

    def state(self, name: str) -> str:
        return "loading"
