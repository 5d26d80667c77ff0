"""The LoRA bank: a host's LoRA factors stacked once for routed batches without gradients, kept across passes,
never stale; LoRA rows take it beside adapters of other methods on the same host. (IA)³ output vectors of many
adapters likewise scale a routed batch at once."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit import IA3, Bottleneck, DoRA, LoRA
from peftkit.core.slot import BATCHED_MIN_GROUPS, SLOT_ATTR
from peftkit.methods.additive.ia3 import IA3Delta
from peftkit.methods.reparameterized.lora import LoRABank, LoRADelta

from .checks import row_alone
from .conftest import randomize

HOSTS = ["attn.q", "attn.v", "ffn.0"]


def _bank(model: nn.Module, host: str = "attn.q") -> LoRABank:
    return getattr(model.get_submodule(host), SLOT_ATTR)._banks[LoRADelta]


def _assert_rows(model: nn.Module, ids: torch.Tensor, rows: list[str | None], tol: float = 1e-5) -> None:
    """The routed batch (no gradients) equals each row run alone with its adapter."""
    with torch.no_grad():
        with peftkit.routed(model, rows):
            mixed = model(ids)
        for row, name in enumerate(rows):
            torch.testing.assert_close(mixed[row], row_alone(model, ids, row, name), rtol=tol, atol=tol)


def _loras(model: nn.Module, ranks: list[int]) -> list[str]:
    """LoRA adapters of these ranks with distinct scalings (one rsLoRA, one also on the embedding) on HOSTS."""
    names = [f"n{i}" for i in range(len(ranks))]
    for i, (name, rank) in enumerate(zip(names, ranks)):
        targets = HOSTS + ["embed"] if i == 1 else HOSTS  # an embedding delta is left to the group loop
        peftkit.attach(model, LoRA(r=rank, alpha=float(i + 1), rslora=i == 2, targets=targets), name)
    randomize(model)
    return names


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 50, (8, 5))


ROWS = ["n3", "n0", None, "n4", "n1", "n2", "n0", "n5"]


def test_mixed_ranks_and_scalings_equal_rows_alone(tiny, ids) -> None:
    names = _loras(tiny, [1, 2, 3, 4, 5, 6])
    _assert_rows(tiny, ids, ROWS)
    bank = _bank(tiny)
    assert set(bank._entries) == set(names) and bank.a.shape[1:] == (6, 16) and bank.b.shape[1:] == (6, 16)
    assert not bank.a[0].any() and not bank.b[0].any()  # rows of no adapter here
    a_before = bank.a
    _assert_rows(tiny, ids, list(reversed(ROWS)))
    assert bank.a is a_before  # kept across passes, not stacked again


def test_changed_weights_and_reattached_adapters_are_never_stale(tiny, ids) -> None:
    _loras(tiny, [2, 2, 2, 2, 2, 2])
    _assert_rows(tiny, ids, ROWS)
    with torch.no_grad():
        tiny.attn.q.peftkit.n3.lora_B.mul_(-2.0)  # in place: the version counter moves
        tiny.attn.v.peftkit.n4.lora_A.data = torch.randn(2, 16)  # new storage, the same Parameter
    tiny.ffn[0].peftkit.n0.scaling = 5.0
    _assert_rows(tiny, ids, ROWS)
    place = _bank(tiny)._entries["n5"].position
    peftkit.remove(tiny, "n5")
    assert "n5" not in _bank(tiny)._entries
    peftkit.attach(tiny, LoRA(r=7, targets=HOSTS), "n5")  # same name, another rank and other factors
    randomize(tiny, "n5")
    _assert_rows(tiny, ids, ROWS)
    assert _bank(tiny)._entries["n5"].position == place and _bank(tiny).a.shape[1] == 7


def test_training_steps_reach_the_bank_and_gradients_flow(tiny, ids) -> None:
    """With gradients the factors are stacked afresh (differentiable); steps between no-grad passes show up."""
    names = _loras(tiny, [1, 2, 3, 4, 5, 6])
    _assert_rows(tiny, ids, ROWS)
    optimizer = torch.optim.SGD([p for n in names for p in peftkit.adapter_parameters(tiny, n)], lr=0.5)
    for _ in range(2):
        with peftkit.routed(tiny, ROWS):
            tiny(ids).square().mean().backward()
        assert all(tiny.attn.q.peftkit.get_submodule(n).lora_A.grad.abs().sum() > 0 for n in names)
        optimizer.step()
        optimizer.zero_grad()
        _assert_rows(tiny, ids, ROWS)


def test_inference_mode_then_no_grad(tiny, ids) -> None:
    _loras(tiny, [2, 3, 4, 5, 6, 7])
    with torch.inference_mode(), peftkit.routed(tiny, ROWS):
        tiny(ids)
    with torch.no_grad():
        tiny.attn.q.peftkit.n0.lora_A.add_(1.0)
    _assert_rows(tiny, ids, ROWS)


def test_other_methods_on_the_host_leave_lora_rows_on_the_bank(tiny, ids) -> None:
    lora = _loras(tiny, [1, 2, 3, 4])
    assert len(lora) >= BATCHED_MIN_GROUPS
    peftkit.attach(tiny, IA3(targets=HOSTS, feedforward=["ffn.0"]), "ia3")
    peftkit.attach(tiny, Bottleneck(bottleneck=4, placement="parallel", targets=HOSTS), "adapter")
    peftkit.attach(tiny, DoRA(r=2, targets=HOSTS), "dora")
    randomize(tiny)
    rows = ["ia3", "n0", "adapter", "n1", "dora", "n2", None, "n3"]
    _assert_rows(tiny, ids, rows)
    assert set(_bank(tiny, "ffn.0")._entries) == set(lora)


def test_half_precision_host(tiny, ids) -> None:
    tiny.to(torch.bfloat16)
    _loras(tiny, [1, 2, 3, 4, 5, 6])  # factors stay float32 beside the bf16 weights
    _assert_rows(tiny, ids, ROWS, tol=1e-2)
    assert _bank(tiny).a.dtype == torch.float32


def test_many_ia3_output_vectors_scale_a_routed_batch_at_once(tiny, ids, monkeypatch) -> None:
    """(IA)³ with many adapters on a host takes the batched path without gradients (one per-row scale), and rows
    equal each row alone; beside LoRA and bottleneck rows, and rows of no adapter."""
    names = [f"s{i}" for i in range(BATCHED_MIN_GROUPS + 1)]
    for name in names:
        peftkit.attach(tiny, IA3(targets=HOSTS, feedforward=["ffn.0"]), name)
    peftkit.attach(tiny, LoRA(r=2, targets=HOSTS), "lora")
    peftkit.attach(tiny, Bottleneck.preset("pfeiffer", bottleneck=4, targets=["ffn.0"]), "adapter")
    randomize(tiny)
    batched = IA3Delta.add_routed_batch_.__func__
    applied: list[tuple[str, ...]] = []
    monkeypatch.setattr(IA3Delta, "add_routed_batch_",
                        classmethod(lambda cls, *args: applied.append(batched(cls, *args)) or applied[-1]))
    _assert_rows(tiny, ids, ["s0", "s1", None, "s2", "lora", "s3", "adapter", "s4"])
    assert tuple(names) in applied  # the output-form hosts (attn.q, attn.v) scaled every (IA)³ row at once
