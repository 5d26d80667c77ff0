"""DyLoRA: truncated-rank formula, rank sampling, truncation equals a plain LoRA, merge, routing, files, learning."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit import DyLoRA, LoRA, dylora_sample_rank, dylora_truncate, set_rank

from .bbc import LEARNS, MARGIN, bbc_accuracy, fit_bbc, head_only
from .conftest import randomize
from .checks import assert_routed_matches_rows
from .test_method_steps import TrainRanks


def _linear_with_dylora(**kwargs) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(nn.Linear(12, 7))
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.attach(model, DyLoRA(targets=["0"], **kwargs))
    randomize(model)
    return model, w0, b0


def test_forward_uses_sampled_rank_in_training_and_chosen_rank_in_eval() -> None:
    model, w0, b0 = _linear_with_dylora(r_min=2, r_max=6, alpha=4)
    d = model[0].peftkit["default"]
    a, b, x = d.lora_A, d.lora_B, torch.randn(5, 12)

    def formula(k: int) -> torch.Tensor:  # W0 x + (α/k) B[:, :k] A[:k] x
        return x @ w0.T + b0 + (4 / k) * (x @ a[:k].T @ b[:, :k].T)

    model.eval()
    torch.testing.assert_close(model(x), formula(6))  # default eval rank: r_max
    set_rank(model, "default", 3)
    torch.testing.assert_close(model(x), formula(3))
    model.train()
    rank = dylora_sample_rank(model, "default", torch.Generator().manual_seed(1))
    assert d.train_rank == rank and d.eval_rank == 3
    torch.testing.assert_close(model(x), formula(rank))
    assert not torch.allclose(formula(2), formula(6), atol=1e-3)  # the ranks really differ


def test_sampling_is_reproducible_covers_the_range_and_is_shared(tiny) -> None:
    peftkit.attach(tiny, DyLoRA(r_min=2, r_max=5, targets="all-linear"))
    torch.manual_seed(3)
    draws = [dylora_sample_rank(tiny, "default") for _ in range(200)]
    torch.manual_seed(3)
    assert [dylora_sample_rank(tiny, "default") for _ in range(200)] == draws  # torch's RNG drives it
    assert set(draws) == {2, 3, 4, 5}
    seeded = [dylora_sample_rank(tiny, "default", torch.Generator().manual_seed(7)) for _ in range(2)]
    assert seeded[0] == seeded[1]  # or an explicit generator
    ranks = {tiny.get_submodule(h).peftkit["default"].train_rank for h in ["attn.q", "attn.v", "ffn.0", "head"]}
    assert ranks == {seeded[-1]}  # one sample for every layer of the adapter


@pytest.mark.parametrize("k", [1, 3])
def test_truncated_rank_equals_plain_lora_from_the_leading_factors(tiny, ids, k: int) -> None:
    plain = copy.deepcopy(tiny)
    peftkit.attach(tiny, DyLoRA(r_min=1, r_max=5, alpha=6, targets="all-linear"))
    randomize(tiny)
    peftkit.attach(plain, LoRA(r=k, alpha=6, targets="all-linear"))
    with torch.no_grad():
        for name, module in tiny.named_modules():
            if hasattr(module, "peftkit"):
                d, p = module.peftkit["default"], plain.get_submodule(name).peftkit["default"]
                p.lora_A.copy_(d.lora_A[:k])
                p.lora_B.copy_(d.lora_B[:, :k])
    tiny.eval()
    set_rank(tiny, "default", k)
    torch.testing.assert_close(tiny(ids), plain(ids))
    dylora_truncate(tiny, "default", k)
    assert peftkit.adapters(tiny)["default"].r_max == k and tiny.attn["q"].peftkit["default"].lora_A.shape[0] == k
    torch.testing.assert_close(tiny(ids), plain(ids))


def test_fresh_adapter_is_exact_noop(tiny, ids) -> None:
    before = tiny(ids)
    peftkit.attach(tiny, DyLoRA(r_min=1, r_max=4, targets="all-linear"))
    dylora_sample_rank(tiny, "default")
    assert torch.equal(tiny(ids), before)
    tiny.eval()
    assert torch.equal(tiny(ids), before)


def test_merge_uses_the_chosen_rank_and_unmerge_restores(tiny, ids) -> None:
    w0 = tiny.ffn[0].weight.detach().clone()
    peftkit.attach(tiny, DyLoRA(r_min=1, r_max=4, alpha=3, targets="all-linear"))
    randomize(tiny)
    tiny.eval()
    set_rank(tiny, "default", 2)
    unmerged = tiny(ids)
    peftkit.merge(tiny)
    torch.testing.assert_close(tiny(ids), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        set_rank(tiny, "default", 3)
    peftkit.unmerge(tiny)
    torch.testing.assert_close(tiny.ffn[0].weight, w0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_mixed_batch_with_lora_and_base_rows_equals_rows_alone(tiny, ids, training: bool) -> None:
    peftkit.attach(tiny, DyLoRA(r_min=1, r_max=4, targets=["q", "v", "ffn.0"]), "dy")
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "k"]), "lora")
    randomize(tiny)
    tiny.train(training)
    set_rank(tiny, "dy", 3)
    dylora_sample_rank(tiny, "dy", torch.Generator().manual_seed(0))
    rows = ["dy", "lora", None, "dy", None, "lora"]
    assert_routed_matches_rows(tiny, ids, rows)


def test_save_load_round_trip_and_truncated_save(tiny, ids, tmp_path) -> None:
    base = copy.deepcopy(tiny)
    peftkit.attach(tiny, DyLoRA(r_min=2, r_max=6, alpha=5, targets="all-linear"))
    randomize(tiny)
    tiny.eval()
    peftkit.save(tiny, tmp_path / "full")
    dylora_truncate(tiny, "default", 3)
    peftkit.save(tiny, tmp_path / "r3")
    full, small = copy.deepcopy(base).eval(), copy.deepcopy(base).eval()
    peftkit.load(full, tmp_path / "full")
    peftkit.load(small, tmp_path / "r3")
    set_rank(full, "default", 3)  # any trained rank can be chosen after loading
    assert peftkit.adapters(small)["default"] == DyLoRA(r_min=2, r_max=3, alpha=5, targets="all-linear")
    assert torch.equal(small(ids), tiny(ids))
    torch.testing.assert_close(full(ids), tiny(ids))


def test_attaching_to_an_eval_model_runs_the_adapter_in_eval_mode(tiny, ids) -> None:
    tiny.eval()  # a new delta must follow its host's mode: eval rank here, no dropout for LoRA
    peftkit.attach(tiny, DyLoRA(r_min=1, r_max=4, targets=["q"]), "dy")
    peftkit.attach(tiny, LoRA(r=2, dropout=0.5, init="gaussian", targets=["v"]), "lora")
    randomize(tiny)
    assert not tiny.attn["q"].peftkit["dy"].training and not tiny.attn["v"].peftkit["lora"].training
    peftkit.activate(tiny, "lora")
    assert torch.equal(tiny(ids), tiny(ids))


@pytest.mark.parametrize(("kwargs", "field"), [({"r_min": 5, "r_max": 4}, "r_min"), ({"r_min": 0}, "r_min"),
                                               ({"r_max": 0}, "r_max"), ({"alpha": 0}, "alpha"), ({"rank": 4}, "rank")])
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DyLoRA(targets=["q"], **kwargs)


def test_rank_and_method_errors(tiny) -> None:
    peftkit.attach(tiny, DyLoRA(r_min=2, r_max=4, targets=["q"]), "dy")
    peftkit.attach(tiny, LoRA(targets=["q"]), "lora")
    for k in (1, 5):
        with pytest.raises(ValueError, match=rf"rank {k} is outside .*\[2, 4\]"):
            set_rank(tiny, "dy", k)
    with pytest.raises(ValueError, match="not DyLoRA"):
        dylora_sample_rank(tiny, "lora")


def test_dylora_learns_bbc_at_full_and_truncated_rank() -> None:
    drawn = TrainRanks()  # the ranks DyLoRA's own training step sampled
    result, model, _ = fit_bbc(DyLoRA(r_min=1, r_max=8, alpha=16, targets=["query", "value"]), callbacks=[drawn])
    assert result.accuracy_after > LEARNS
    assert len(set(drawn.ranks)) > 4  # the training really ran at many ranks
    set_rank(model, "default", 2)
    truncated, control = bbc_accuracy(model), head_only(3e-3).accuracy_after
    print(f"dylora at rank 2: {truncated:.3f} (head alone at lr 3e-3: {control:.3f})")
    assert truncated >= control + MARGIN  # the truncated adapter still carries what was learned
