"""Tiny randomly initialised transformers with the bundled models' tokenizers, registered for training configs
("tiny-bert", "tiny-llama"): the trainer's unit tests run on them in well under a second per step."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn

from peftkit.train import register_model


@lru_cache(maxsize=1)
def bert_tokenizer() -> Any:
    from peftkit.models import load_minilm

    return load_minilm()[1]


@lru_cache(maxsize=1)
def llama_tokenizer() -> Any:
    from peftkit.models import load_smollm2

    return load_smollm2()[1]


def tiny_bert(num_labels: int | None) -> tuple[nn.Module, Any]:
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = bert_tokenizer()
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, num_labels=num_labels or 2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config), tokenizer


def tiny_llama(_: int | None) -> tuple[nn.Module, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = llama_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return LlamaForCausalLM(config).to(torch.float32), tokenizer


register_model("tiny-bert", tiny_bert, head=("classifier",))
register_model("tiny-llama", tiny_llama)
