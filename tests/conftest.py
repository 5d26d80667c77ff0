"""Tiny random models shared by the tests (no downloads: built from configs)."""
from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class TinyNet(nn.Module):
    """Linear layers with sibling q/k/v (shared input), an FFN, a conv and an embedding."""

    def __init__(self, vocab: int = 50, d: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.attn = nn.ModuleDict({"q": nn.Linear(d, d), "k": nn.Linear(d, d), "v": nn.Linear(d, d, bias=False)})
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # [B, T, d]
        q, k, v = (self.attn[n](h) for n in "qkv")
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        h = h + att @ v
        h = h + self.ffn(h)
        return self.head(h.mean(1))  # [B, 3]


@pytest.fixture
def tiny() -> TinyNet:
    return TinyNet()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 50, (6, 5))


def randomize(model: nn.Module, name: str | None = None, scale: float = 0.3) -> None:
    """Give adapter parameters non-zero values so an adapter really changes outputs."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            pname = f".{pname}"  # a root delta's parameters (prompts, prefixes) start with "peftkit."
            if ".peftkit." in pname and (name is None or f".peftkit.{name}." in pname):
                p.copy_(torch.randn_like(p) * scale)
