"""LoRAHub: the composition against its formula, a search that finds a new task's weights and beats the uniform
average on held-out examples, seeded reproducibility with both optimisers, and the refusals.

The new task is a known composition of the K adapters (none of them alone), so the search has a right answer; the
BBC version (adapters trained on topic pairs, a new pair as the task) is benchmarks/bench_lorahub.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.compose import AdapterMergeError, lorahub
from peftkit.compose.lorahub import FactorMix

from .conftest import randomize

HOSTS = ["0", "2"]
NAMES = ["t0", "t1", "t2", "t3"]
TARGET = [0.9, -0.6, 0.0, 0.0]  # the new task: a composition of t0 and t1


def _model_with_loras(heads: list[str] = []) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Linear(16, 3))
    for name in NAMES:
        peftkit.attach(model, peftkit.LoRA(r=3, alpha=6, targets=HOSTS, modules_to_save=heads), name=name)
    randomize(model, scale=0.3)
    return model


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _task(model: nn.Module) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """Few examples (2 batches of 8) and 200 held-out rows of the new task: the outputs of the TARGET composition."""
    x = torch.randn(216, 12, generator=torch.Generator().manual_seed(1))
    FactorMix(model, NAMES).attach("target", TARGET)
    with torch.no_grad():
        y = model(x)
    peftkit.remove(model, "target")
    return [(x[:8], y[:8]), (x[8:16], y[8:16])], (x[16:], y[16:])


def _held_out_loss(model: nn.Module, weights: list[float], held_out: tuple[torch.Tensor, torch.Tensor]) -> float:
    FactorMix(model, NAMES).attach("scored", weights)
    with torch.no_grad():
        loss = float(_mse(model, held_out))
    peftkit.remove(model, "scored")
    return loss


def test_factor_mix_is_the_papers_formula_and_deltas_the_weighted_sum() -> None:
    """A = Σ w_i A_i, B = Σ w_i s_i B_i (the result's s = 1); head = base + Σ w_i (head_i − base); mixing="deltas"
    gives B A = Σ w_i s_i B_i A_i exactly."""
    model = _model_with_loras(heads=["3"])
    weights = [0.7, -1.2, 0.3, 1.1]
    FactorMix(model, NAMES).attach("hub", weights)
    for host in HOSTS:
        module = model.get_submodule(host)
        own = [module.peftkit[n] for n in NAMES]
        a = sum(w * d.lora_A for w, d in zip(weights, own))
        b = sum(w * d.scaling * d.lora_B for w, d in zip(weights, own))
        hub = module.peftkit["hub"]
        torch.testing.assert_close(hub.delta_weight(), b @ a)
    head, copies = model[3], [model[3].peftkit[n].module for n in NAMES]
    expected = head.weight + sum(w * (c.weight - head.weight) for w, c in zip(weights, copies))
    torch.testing.assert_close(head.peftkit["hub"].module.weight, expected)
    result = lorahub(model, NAMES, [(torch.randn(4, 12), torch.randn(4, 3))], _mse, budget=3, mixing="deltas",
                     new_name="sum")
    for host in HOSTS:
        module = model.get_submodule(host)
        dense = sum(w * module.peftkit[n].delta_weight() for n, w in result.weights.items())
        torch.testing.assert_close(module.peftkit["sum"].delta_weight(), dense)


def test_deltas_mixing_sums_the_weight_changes_of_lora_variants() -> None:
    """A LoHa has no LoRA factors to mix: mixing="deltas" composes it with a LoRA as Σ w_i ΔW_i exactly, a dense
    change of each module's weight."""
    model = _model_with_loras()
    peftkit.attach(model, peftkit.LoHa(r=2, targets=HOSTS), name="loha")
    randomize(model, scale=0.3)
    result = lorahub(model, ["t0", "loha"], [(torch.randn(4, 12), torch.randn(4, 3))], _mse, budget=4,
                     mixing="deltas", new_name="sum")
    assert len(result.history) == 4 and result.weights != {"t0": 0.0, "loha": 0.0}
    for host in HOSTS:
        module = model.get_submodule(host)
        dense = sum(w * module.peftkit[n].delta_weight() for n, w in result.weights.items())
        torch.testing.assert_close(module.peftkit["sum"].weight.dense(), dense)


@pytest.mark.parametrize("optimizer", ["ngopt", "cma"])
def test_search_beats_the_uniform_average_on_held_out_rows_and_is_reproducible(optimizer: str) -> None:
    model = _model_with_loras()
    examples, held_out = _task(model)
    runs = [lorahub(model, NAMES, examples, _mse, budget=200, seed=3, l1=1e-4, optimizer=optimizer, new_name=f"hub{i}")
            for i in range(2)]
    assert runs[0].history == runs[1].history and len(runs[0].history) == 200  # same seed: same candidates
    found = list(runs[0].weights.values())
    torch.testing.assert_close(model[0].peftkit["hub0"].lora_A, model[0].peftkit["hub1"].lora_A, rtol=0, atol=0)
    assert peftkit.active_adapters(model) == ["hub1"]
    hub, uniform = _held_out_loss(model, found, held_out), _held_out_loss(model, [0.25] * 4, held_out)
    start = _held_out_loss(model, [0.0] * 4, held_out)
    print(f"{optimizer}: weights {[round(w, 3) for w in found]} (target {TARGET}); held-out MSE {hub:.5f} vs "
          f"uniform average {uniform:.5f}, base {start:.5f}")
    assert runs[0].best.objective == min(c.objective for c in runs[0].history)
    assert hub < 0.2 * uniform and hub < 0.2 * start
    if optimizer == "cma":  # NGOpt picks a deterministic method at this budget; CMA-ES draws from the seed
        other = lorahub(model, NAMES, examples, _mse, budget=10, seed=4, optimizer="cma", new_name="other")
        assert other.history[:10] != runs[0].history[:10]


def test_l1_penalty_is_lambda_times_the_sum_of_weights_and_defaults_to_the_papers() -> None:
    model = _model_with_loras()
    examples, _ = _task(model)
    result = lorahub(model, NAMES, examples, _mse, budget=5)
    for candidate in result.history:
        assert candidate.penalty == pytest.approx(0.05 / 4 * sum(abs(w) for w in candidate.weights))
    assert result.history[0].weights == (0.0,) * 4  # the search starts at w = 0, as the paper's
    heavy = lorahub(model, NAMES, examples, _mse, budget=5, l1=2.0, new_name="heavy")
    assert heavy.history[1].penalty == pytest.approx(2.0 * sum(abs(w) for w in heavy.history[1].weights))


def test_refusals_name_what_is_wrong() -> None:
    model = _model_with_loras()
    batch = [(torch.randn(2, 12), torch.randn(2, 3))]
    with pytest.raises(ValueError, match="at least one batch"):
        lorahub(model, NAMES, [], _mse)
    with pytest.raises(ValueError, match="two or more LoRAs"):
        lorahub(model, ["t0"], batch, _mse)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        lorahub(model, NAMES, batch, _mse, optimizer="adam")
    with pytest.raises(ValueError, match="budget"):
        lorahub(model, NAMES, batch, _mse, budget=0)
    peftkit.attach(model, peftkit.LoHa(r=2, targets=HOSTS), name="loha")
    with pytest.raises(AdapterMergeError, match="not all plain LoRAs: use mixing='deltas'"):
        lorahub(model, ["t0", "loha"], batch, _mse)

    def nan_loss(model: nn.Module, batch: object) -> torch.Tensor:
        return torch.tensor(float("nan"))

    with pytest.raises(ValueError, match="the loss on the examples is nan"):
        lorahub(model, NAMES, batch, nan_loss, budget=2)
    assert "lorahub" not in peftkit.adapters(model)  # a failed search leaves no adapter behind
