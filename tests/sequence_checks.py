"""Tiny random transformers and row checks for sequence adapters (prompts and prefixes change lengths)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import peftkit

VOCAB = 40


def tiny_bert() -> BertForSequenceClassification:
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      initializer_range=0.3)).eval()  # 0.02 (the default) gives near-constant outputs


def is_causal(model: nn.Module) -> bool:
    return not isinstance(model, BertForSequenceClassification)


def logits(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, **kwargs).logits


def alone(model: nn.Module, ids: torch.Tensor, name: str | None) -> torch.Tensor:
    """Logits of `ids` (one or more rows) with adapter `name` active (None: the bare base)."""
    if name is None:
        with peftkit.disabled(model):
            return logits(model, ids)
    peftkit.activate(model, name)
    return logits(model, ids)


def last(out: torch.Tensor) -> torch.Tensor:
    """Pooled outputs as they are; token outputs at the last position (a real token in both layouts' causal models)."""
    return out if out.dim() == 2 else out[:, -1]


def real_part(model: nn.Module, mixed_row: torch.Tensor, alone_row: torch.Tensor) -> torch.Tensor:
    """The routed row's outputs at the positions its lone run has (see core.sequence's layout)."""
    if mixed_row.dim() == 1:  # pooled: one output per row
        return mixed_row
    n = alone_row.shape[0]
    return mixed_row[-n:] if is_causal(model) else mixed_row[:n]


def assert_routed_rows(model: nn.Module, ids: torch.Tensor, rows: Sequence[str | None]) -> None:
    """Each row of a routed batch equals that row run alone, and the adapters really differ."""
    with peftkit.routed(model, rows):
        mixed = logits(model, ids)
    outs = []
    for row, name in enumerate(rows):
        single = alone(model, ids[row:row + 1], name)[0]
        torch.testing.assert_close(real_part(model, mixed[row], single), single, rtol=1e-5, atol=1e-5)
        outs.append(single[-1])
    distinct = {name: out for name, out in zip(rows, outs)}
    values = list(distinct.values())
    assert all(not torch.allclose(a, b, atol=1e-4) for i, a in enumerate(values) for b in values[i + 1:])


def assert_routed_grads(model: nn.Module, ids: torch.Tensor, rows: Sequence[str | None]) -> None:
    """Gradients of a routed batch equal the sum over rows run alone (loss on each row's last real token)."""
    model.zero_grad(set_to_none=True)
    with peftkit.routed(model, rows):
        last(logits(model, ids)).square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert mixed
    model.zero_grad(set_to_none=True)
    for row, name in enumerate(rows):
        if name is not None:
            last(alone(model, ids[row:row + 1], name)).square().sum().backward()
    for n, p in model.named_parameters():
        if n in mixed:
            torch.testing.assert_close(mixed[n], p.grad, rtol=1e-4, atol=1e-5)
    model.zero_grad(set_to_none=True)
