"""LoRA-FA: A frozen (no grad, not a parameter), less memory saved for backward than LoRA, files, routing, learning."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit import LoRA, LoRAFA

from .bbc import LEARNS, fit_bbc
from .conftest import randomize
from .checks import assert_routed_matches_rows


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward, each storage counted once (as memory is)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(storages.values())


def test_a_is_frozen_and_only_b_gets_gradients(tiny, ids) -> None:
    peftkit.attach(tiny, LoRAFA(r=4, targets="all-linear", rank_pattern={"head": 2}))
    randomize(tiny)
    tiny(ids).square().sum().backward()
    d = tiny.ffn[0].peftkit["default"]
    assert "lora_A" in dict(d.named_buffers()) and "lora_A" not in dict(d.named_parameters())
    assert not d.lora_A.requires_grad and d.lora_A.grad is None and d.lora_A.abs().sum() > 0
    assert d.lora_B.grad is not None and d.lora_B.grad.abs().sum() > 0
    peftkit.set_trainable(tiny, "default", True)
    assert {n.rpartition(".")[2] for n, p in tiny.named_parameters() if p.requires_grad} == {"lora_B"}
    assert peftkit.summary(tiny).trainable == sum(p.numel() for p in peftkit.adapter_parameters(tiny, "default"))


@pytest.mark.parametrize("input_needs_grad", [False, True])
def test_less_memory_is_saved_for_backward_than_lora(input_needs_grad: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 256, requires_grad=input_needs_grad)  # the activation entering the adapted layer
    used = {}
    for config in (LoRA(r=4, targets=["0"]), LoRAFA(r=4, targets=["0"])):
        model = peftkit.attach(nn.Sequential(nn.Linear(256, 256)), config)
        used[config.method] = _saved_bytes(model, x)
    # LoRA keeps x for A's gradient; LoRA-FA does not: it saves at least x's 64 KiB less
    assert used["lorafa"] <= used["lora"] - x.numel() * x.element_size()


def test_forward_matches_formula_and_merges(tiny, ids) -> None:
    model = nn.Sequential(nn.Linear(12, 7))
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.attach(model, LoRAFA(r=4, alpha=6, targets=["0"]))
    randomize(model)
    d = model[0].peftkit["default"]
    x = torch.randn(3, 12)
    torch.testing.assert_close(model(x), x @ w0.T + b0 + 1.5 * (x @ d.lora_A.T @ d.lora_B.T))
    before = tiny(ids)
    peftkit.attach(tiny, LoRAFA(r=4, targets="all-linear", rank_pattern={"head": 2}))
    assert torch.equal(tiny(ids), before)  # B = 0: a fresh adapter is an exact no-op
    randomize(tiny)
    unmerged = tiny(ids)
    peftkit.merge(tiny)
    torch.testing.assert_close(tiny(ids), unmerged, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_and_peft_export_as_plain_lora(tiny, ids, tmp_path) -> None:
    base, other = copy.deepcopy(tiny), copy.deepcopy(tiny)
    peftkit.attach(tiny, LoRAFA(r=3, alpha=6, targets=["q", "v", "ffn.2"]))
    randomize(tiny)
    peftkit.save(tiny, tmp_path / "fa")
    peftkit.load(base, tmp_path / "fa")
    assert isinstance(peftkit.adapters(base)["default"], LoRAFA)
    assert torch.equal(base(ids), tiny(ids))  # the frozen A travels with the adapter
    peftkit.save(tiny, tmp_path / "peft", format="peft")
    loaded = peftkit.read_adapter(tmp_path / "peft")[0]
    assert type(loaded) is LoRA  # PEFT "LORA" files still load as plain LoRA
    peftkit.load(other, tmp_path / "peft")
    torch.testing.assert_close(other(ids), tiny(ids))


def test_mixed_batch_with_lora_and_base_rows_equals_rows_alone(tiny, ids) -> None:
    peftkit.attach(tiny, LoRAFA(r=3, targets=["q", "v", "ffn.0"]), "fa")
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "k"]), "lora")
    randomize(tiny)
    rows = ["fa", "lora", None, "fa", None, "lora"]
    assert_routed_matches_rows(tiny, ids, rows)


@pytest.mark.parametrize(("kwargs", "field"), [({"init": "pissa"}, "init"), ({"r": 0}, "r"), ({"rank": 2}, "rank")])
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LoRAFA(targets=["q"], **kwargs)


def test_embedding_is_not_a_host(tiny) -> None:
    with pytest.raises(peftkit.TargetError, match="embed"):
        peftkit.attach(tiny, LoRAFA(targets=["embed"]))


def test_lorafa_learns_bbc() -> None:
    result, _, _ = fit_bbc(LoRAFA(r=8, alpha=16, targets=["query", "value"]))
    assert result.accuracy_after > LEARNS
