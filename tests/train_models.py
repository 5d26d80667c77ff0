"""Tiny randomly initialised transformers with the bundled models' tokenizers, registered for training configs
("tiny-bert", "tiny-llama", "tiny-dinov2"): the trainer's unit tests run on them in well under a second per step;
plus the small training configs and data files those tests build."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.models import IMAGENET_MEAN, IMAGENET_STD, ImageInput
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


def tiny_dinov2(num_labels: int | None) -> tuple[nn.Module, ImageInput]:
    from transformers import Dinov2Config, Dinov2ForImageClassification

    config = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=4,
                          image_size=16, num_labels=num_labels or 2)
    return Dinov2ForImageClassification(config), ImageInput(IMAGENET_MEAN, IMAGENET_STD, patch=4)


register_model("tiny-bert", tiny_bert, head=("classifier",))
register_model("tiny-llama", tiny_llama)
register_model("tiny-dinov2", tiny_dinov2, head=("classifier",))


def tiny_config(tmp_path: Path, **sections) -> dict:
    config = {"task": "classify-text", "model": {"name": "tiny-bert"},
              "method": {"method": "lora", "r": 2, "targets": ["query", "value"]},
              "data": {"name": "bbc-news", "train_limit": 16, "eval_limit": 8, "max_length": 16},
              "schedule": {"epochs": 1, "batch_size": 8}, "output": {"dir": str(tmp_path / "run"), "plot": False},
              "progress": False}
    for key, value in sections.items():  # sections merge into the defaults above, except the method (replaced)
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config and key != "method" else value
    return config


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def local(tmp_path: Path, train: Path, **data) -> dict:
    return tiny_config(tmp_path, data={"name": None, "train": str(train), "train_limit": None, "eval_limit": None,
                                       "max_length": 16, **data})
