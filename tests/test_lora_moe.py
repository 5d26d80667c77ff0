"""Mixture of LoRA experts: the forward and the balance loss against their formulas token by token, per-row routing
beside other adapters, files, refusals, a router that learns to balance (usage reported), and learning on BBC."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import peftkit
from peftkit.compose import AdapterMergeError, merge_adapters
from peftkit.core.training import TrainingContext
from peftkit.methods import LoRAMoE, expert_usage, lora_moe_balance_loss
from peftkit.methods.reparameterized.lora_moe import BalanceLoss

from .checks import assert_routed_grads_match_rows, assert_routed_matches_rows, model_output
from .conftest import randomize


def _by_hand(delta: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """s · Σ_{e ∈ top-k(p)} (p_e / Σ_top-k p) B_e A_e x for each token, with plain loops."""
    out = torch.zeros(*x.shape[:-1], delta.lora_B.shape[1])
    for index in itertools.product(*(range(n) for n in x.shape[:-1])):
        token = x[index]
        p = torch.softmax(delta.router @ token, dim=0)
        chosen = sorted(range(len(p)), key=lambda e: -float(p[e]))[:k]
        total = sum(p[e] for e in chosen)
        out[index] = sum(p[e] / total * delta.scaling * delta.lora_B[e] @ (delta.lora_A[e] @ token) for e in chosen)
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_forward_matches_the_formula_token_by_token(top_k: int) -> None:
    model = nn.Sequential(nn.Linear(6, 5))
    base = copy.deepcopy(model[0])
    peftkit.attach(model, LoRAMoE(experts=3, top_k=top_k, r=2, alpha=3, targets=["0"]))
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(model(x), base(x))  # B = 0: a fresh adapter changes nothing
    randomize(model, scale=0.5)
    delta = model[0].peftkit["default"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x) + _by_hand(delta, x, top_k))


def test_balance_loss_is_switchs_formula_and_trains_only_the_router() -> None:
    """L_bal = E Σ_e f_e P_e on the tokens of the passes since the last call, averaged over hosts and passes."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4))
    peftkit.attach(model, LoRAMoE(experts=4, top_k=2, r=2, balance_weight=0.5, targets=["0", "2"]), name="moe")
    randomize(model, scale=0.5)
    x = torch.randn(3, 5, 6)
    model(x)
    with torch.no_grad():  # a pass without gradients records no term
        inputs = {"0": x, "2": torch.tanh(model[0](x))}
    expected = []
    for host, h in inputs.items():
        delta = model.get_submodule(host).peftkit["moe"]
        p = torch.softmax(h.reshape(-1, 6) @ delta.router.T, dim=-1)
        chosen = p.topk(2, dim=-1).indices
        f = torch.stack([(chosen == e).float().sum() for e in range(4)]) / chosen.numel()
        expected.append(4 * (f * p.mean(0)).sum())
    loss = lora_moe_balance_loss(model, "moe")
    torch.testing.assert_close(loss, 0.5 * torch.stack(expected).mean())
    loss.backward()
    for host in inputs:
        delta = model.get_submodule(host).peftkit["moe"]
        assert delta.router.grad.abs().sum() > 0 and delta.lora_A.grad is None and delta.lora_B.grad is None
    assert lora_moe_balance_loss(model, "moe") is None  # taken: nothing recorded since
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    assert lora_moe_balance_loss(model, "moe") is None  # only training passes with gradients record


def test_routes_per_row_beside_other_adapters(tiny, ids) -> None:
    peftkit.attach(tiny, LoRAMoE(experts=3, top_k=2, r=2, targets=["q", "v", "ffn.0"]), name="moe")
    peftkit.attach(tiny, peftkit.LoRA(r=2, targets=["q", "ffn.0"]), name="lora")
    randomize(tiny)
    rows = ["moe", "lora", None, "moe", "lora", "moe"]
    assert_routed_matches_rows(tiny, ids, rows)
    assert_routed_grads_match_rows(tiny, ids, rows)


def test_saves_and_loads_and_counts_usage(tiny, ids, tmp_path) -> None:
    fresh = copy.deepcopy(tiny)
    peftkit.attach(tiny, LoRAMoE(experts=4, top_k=1, r=3, targets=["q", "ffn.2"], modules_to_save=["head"]),
                   name="moe")
    randomize(tiny)
    expected = model_output(tiny, ids)
    usage = expert_usage(tiny, "moe", reset=True)
    assert set(usage) == {"attn.q", "ffn.2"} and all(sum(shares) == pytest.approx(1.0) for shares in usage.values())
    peftkit.save(tiny, tmp_path / "moe", "moe")
    assert peftkit.load(fresh, tmp_path / "moe") == "moe"
    torch.testing.assert_close(model_output(fresh, ids), expected)
    assert set(fresh.attn.q.peftkit["moe"].state_dict()) == {"lora_A", "lora_B", "router"}  # counts are not saved
    assert expert_usage(fresh, "moe") == usage  # the same tokens went to the same experts
    assert expert_usage(tiny, "moe") == {host: [0.0] * 4 for host in usage}  # reset


def test_refusals(tiny) -> None:
    with pytest.raises(ValueError, match="top_k = 5 exceeds the 4 experts"):
        LoRAMoE(experts=4, top_k=5, targets=["q"])
    peftkit.attach(tiny, LoRAMoE(r=2, targets=["q"]), name="moe")
    with pytest.raises(peftkit.MergeError, match="gates its experts per token"):
        peftkit.merge(tiny, "moe")
    peftkit.attach(tiny, peftkit.LoRA(r=2, targets=["q"]), name="lora")
    with pytest.raises(AdapterMergeError, match="'moe' .* cannot be merged"):
        merge_adapters(tiny, {"moe": 1.0, "lora": 1.0})
    with pytest.raises(ValueError, match="'lora' is lora, not lora_moe"):
        expert_usage(tiny, "lora")
    with pytest.raises(ValueError, match="rank 20 exceeds"):
        peftkit.attach(tiny, LoRAMoE(r=20, targets=["q"]), name="big")


def test_router_learns_to_balance_from_a_skewed_start() -> None:
    """Every token starts at expert 0 (the router's first row points along the inputs' mean); trained on a task
    through the method's own training step, the balance loss falls towards 1, the usage evens out, and the task loss
    falls."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    teacher = copy.deepcopy(model)  # the task: a rank-2 change of the first layer
    with torch.no_grad():
        teacher[0].weight += 0.5 * torch.randn(16, 2) @ torch.randn(2, 8)
    config = LoRAMoE(experts=4, top_k=1, r=2, balance_weight=0.1, targets=["0"])
    peftkit.attach(model, config, name="moe")
    mean = torch.randn(8)
    delta = model[0].peftkit["moe"]
    with torch.no_grad():
        delta.router[0] = 2 * mean / mean.norm()
    x = mean + 0.5 * torch.randn(256, 8)
    y = teacher(x).detach()
    (step,) = config.training_steps(TrainingContext(model, "moe", steps=100))
    assert isinstance(step, BalanceLoss)
    model(x)
    skewed = expert_usage(model, "moe", reset=True)["0"]
    optimizer = torch.optim.Adam(peftkit.adapter_parameters(model, "moe"), lr=3e-2)
    losses = []
    for _ in range(100):
        optimizer.zero_grad()
        losses.append(nn.functional.mse_loss(model(x), y))
        losses[-1].backward()  # as the trainer does: the task loss, then the extra term
        step.extra_loss(None).backward()
        optimizer.step()
    expert_usage(model, "moe", reset=True)
    model(x)
    balanced = expert_usage(model, "moe")["0"]
    first, last = step.history[0], sum(step.history[-10:]) / 10
    print(f"task loss {losses[0]:.3f} -> {losses[-1]:.3f}; balance loss {first:.3f} -> {last:.3f}; usage {[round(u, 2) for u in skewed]} -> "
          f"{[round(u, 2) for u in balanced]}")
    assert max(skewed) > 0.9 and first > 2.5
    assert last < 1.3 and max(balanced) < 0.5
    assert losses[-1] < 0.5 * losses[0]  # the experts learn the task meanwhile

