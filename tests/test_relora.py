"""ReLoRA: a restart folds ΔW into the base, re-initialises the factors and prunes their optimizer state."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit import DyLoRA, LoRA, relora_restart

from .conftest import randomize


def _trained(tiny, ids) -> torch.optim.Optimizer:
    """A LoRA adapter (plus a head copy) after a few AdamW steps: non-zero factors and optimizer state."""
    peftkit.attach(tiny, LoRA(r=3, alpha=6, targets=["q", "v", "ffn.0", "embed"], modules_to_save=["head"]))
    optimizer = torch.optim.AdamW(peftkit.adapter_parameters(tiny, "default"), lr=0.05)
    for _ in range(3):
        tiny(ids).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def _state(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in optimizer.state[param].items()}


def test_restart_keeps_outputs_and_moves_delta_into_the_base(tiny, ids) -> None:
    optimizer = _trained(tiny, ids)
    q = tiny.attn["q"]
    d = q.peftkit["default"]
    w_before, delta_w, a_before = q.weight.detach().clone(), d.delta_weight().detach(), d.lora_A.detach().clone()
    before = tiny(ids)
    relora_restart(tiny, "default", optimizer)
    torch.testing.assert_close(tiny(ids), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.weight.detach(), w_before + delta_w)
    assert torch.equal(d.lora_B, torch.zeros_like(d.lora_B)) and not torch.allclose(d.lora_A, a_before)
    embed = tiny.embed.peftkit["default"]  # an Embedding's LoRA restarts as it starts: A = 0, B random
    assert torch.equal(embed.lora_A, torch.zeros_like(embed.lora_A)) and embed.lora_B.abs().sum() > 0
    # training goes on from the restarted point
    tiny(ids).square().sum().backward()
    optimizer.step()
    assert not torch.allclose(tiny(ids), before, atol=1e-4)


def test_full_reset_zeroes_the_factors_state_and_leaves_the_head_alone(tiny, ids) -> None:
    optimizer = _trained(tiny, ids)
    d, head = tiny.attn["v"].peftkit["default"], tiny.head.peftkit["default"].module.weight
    head_state = _state(optimizer, head)
    relora_restart(tiny, "default", optimizer, prune_ratio=1.0)
    for factor in (d.lora_A, d.lora_B):
        state = optimizer.state[factor]
        assert state["exp_avg"].count_nonzero() == 0 and state["exp_avg_sq"].count_nonzero() == 0
        assert state["step"] == 3  # the step count (bias correction) is not a per-element moment
    for key, value in head_state.items():
        assert torch.equal(optimizer.state[head][key], value)


def test_default_prune_keeps_the_one_percent_with_the_largest_second_moment(tiny, ids) -> None:
    optimizer = _trained(tiny, ids)
    a = tiny.ffn[0].peftkit["default"].lora_A  # [3, 16]: 48 entries, so 1% keeps the single largest
    old = _state(optimizer, a)
    relora_restart(tiny, "default", optimizer)
    top = old["exp_avg_sq"].flatten().argmax()
    for key in ("exp_avg", "exp_avg_sq"):  # one mask: a first moment never outlives its second
        new = optimizer.state[a][key].flatten()
        assert new.count_nonzero() == 1 and new[top] == old[key].flatten()[top]


def test_the_step_after_a_restart_stays_the_size_of_the_learning_rate() -> None:
    """Moments whose magnitudes disagree (the largest |m| is not at the largest v): pruned apart, the kept m over a
    zeroed v with A's zero gradient after a restart would step by lr · m / eps."""
    from peftkit.methods.reparameterized.relora import _prune_state

    factor = nn.Parameter(torch.zeros(10, 10))
    optimizer = torch.optim.AdamW([factor], lr=1e-3, weight_decay=0.0)
    factor.grad = torch.ones_like(factor)
    optimizer.step()
    state = optimizer.state[factor]
    state["exp_avg"].copy_(torch.arange(100.0).view(10, 10))  # |m| largest at the last entry
    state["exp_avg_sq"].copy_(torch.arange(100.0).flip(0).view(10, 10) ** 2)  # v largest at the first
    _prune_state(state, factor, 0.99)
    factor.grad = torch.zeros_like(factor)  # A's gradient while B = 0
    before = factor.detach().clone()
    optimizer.step()
    assert (factor.detach() - before).abs().max() < 1e-2


def test_remove_after_restart_keeps_the_restarts_in_the_base(tiny, ids) -> None:
    optimizer = _trained(tiny, ids)
    q = tiny.attn["q"]
    w_before, delta_w = q.weight.detach().clone(), q.peftkit["default"].delta_weight().detach()
    relora_restart(tiny, "default", optimizer)
    randomize(tiny)  # the next cycle's training
    peftkit.remove(tiny, "default")  # drops only the cycle since the restart (and the head copy)
    torch.testing.assert_close(q.weight.detach(), w_before + delta_w)


def test_errors(tiny, ids) -> None:
    optimizer = _trained(tiny, ids)
    with pytest.raises(ValueError, match="prune_ratio"):
        relora_restart(tiny, "default", optimizer, prune_ratio=1.5)
    peftkit.merge(tiny, "default")
    with pytest.raises(ValueError, match="merged"):
        relora_restart(tiny, "default", optimizer)
    peftkit.unmerge(tiny, "default")
    peftkit.attach(tiny, DyLoRA(targets=["k"]), "dy")
    with pytest.raises(ValueError, match="dylora adapter"):
        relora_restart(tiny, "dy", optimizer)
    peftkit.attach(tiny, LoRA(r=2, init="pissa", targets=["ffn.2"]), "pissa")
    with pytest.raises(ValueError, match="PiSSA"):
        relora_restart(tiny, "pissa", optimizer)
