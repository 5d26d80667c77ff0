"""A tiny random CLIP and a tokenizer built offline (no CLIP weights exist here): for the CLIP method tests."""
from __future__ import annotations

import string

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

CLASSES = ["cat", "dog", "red fox"]
IMAGE_SIZE = 8


def tiny_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE over letters and "." without merges: every word becomes its letters, the last one marked
    as a word end; start and end of text are the last two ids, as in CLIP's own vocabulary."""
    symbols = list(string.ascii_lowercase + ".")
    vocab = {token: i for i, token in enumerate(symbols + [f"{s}</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip(tokenizer: CLIPTokenizer) -> CLIPModel:
    """A randomly initialised CLIPModel: 2-layer text and vision towers of width 16, features of width 32."""
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": IMAGE_SIZE, "patch_size": 4}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
