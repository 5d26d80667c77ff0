"""Print docs/merging.md's table: for two adapters active on the same modules, which merges peftkit allows.

Each cell is found by trying, on a tiny BERT with both adapters on query/value: merging both, the first alone and
the second alone; an allowed merge is also checked to give the unmerged outputs. Run:
`.venv/bin/python scripts/merge_table.py` (tests/test_merge_algebra.py checks the docs hold its current output).
"""
from __future__ import annotations

import torch
from transformers import BertConfig, BertModel

import peftkit
from peftkit import IA3, OFT, SSF, BitFit, Bottleneck, DoRA, LoHa, LoRA, MergeError, VeRA

TARGETS = ["query", "value"]
METHODS = {  # one representative per behaviour; every increment (LoKr, KronA, AdaLoRA, selective...) acts as LoRA
    "LoRA": lambda: LoRA(r=4, targets=TARGETS),
    "VeRA": lambda: VeRA(r=8, targets=TARGETS),
    "LoHa": lambda: LoHa(r=2, targets=TARGETS),
    "BitFit": lambda: BitFit(targets=TARGETS),
    "(IA)³": lambda: IA3(targets=TARGETS),
    "(IA)³ ff": lambda: IA3(targets=TARGETS, feedforward=TARGETS),
    "SSF": lambda: SSF(targets=TARGETS),
    "DoRA": lambda: DoRA(r=4, targets=TARGETS),
    "OFT": lambda: OFT(oft_block_size=4, use_cayley_neumann=False, targets=TARGETS),
    "parallel adapter": lambda: Bottleneck(bottleneck=4, placement="parallel", targets=TARGETS),
    "serial adapter": lambda: Bottleneck(bottleneck=4, targets=TARGETS),
}


def _pair(first: str, second: str) -> BertModel:
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16)).eval()
    for name, method in (("a", first), ("b", second)):
        peftkit.attach(model, METHODS[method](), name=name)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".peftkit.{name}." in f".{pname}":
                    p.add_(torch.randn_like(p) * 0.2)
    peftkit.activate(model, ["a", "b"])
    return model


def allowed(first: str, second: str, merged: list[str]) -> bool:
    """Whether merging `merged` of the pair is allowed; when it is, its outputs must equal the unmerged ones."""
    model = _pair(first, second)
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(input_ids=ids).last_hidden_state
        try:
            peftkit.merge(model, merged)
        except MergeError:
            return False
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, unmerged, rtol=1e-5, atol=1e-5)
    return True


def cell(first: str, second: str) -> str:
    marks = {"both": ["a", "b"], "1st": ["a"], "2nd": ["b"]}
    found = [label for label, merged in marks.items() if allowed(first, second, merged)]
    return ", ".join(found) if found else "—"


def table() -> str:
    names = list(METHODS)
    lines = ["| first ↓ · second → | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| **{a}** | " + " | ".join(cell(a, b) for b in names) + " |" for a in names]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
