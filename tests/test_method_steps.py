"""A method owns its training steps (#16): `run_training` applies each config's `training_steps` and
`fill_from_run`, so a method runs from a plain config. Each test watches the method's own step act: without
it the test fails (FishMask raised MaskNotSelectedError, AdaLoRA's config lacked total_step, the others
trained as plain LoRA / a plain diff)."""
from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.core.registry import adapter_deltas, get_registry
from peftkit.methods import AdaLoRA, AdaLoRAController
from peftkit.methods.reparameterized.dylora import DyLoRADelta
from peftkit.methods.reparameterized.sora import SoRADelta
from peftkit.methods.selective.selection import candidates
from peftkit.methods.selective.sparse import SparseDelta
from peftkit.train import Callback, config_from_mapping, prepare, run_training
from tests.bench_tiny import tiny_bert
from tests.train_models import tiny_config

QV = ["query", "value"]
# 16 BBC rows in batches of 4 for 2 epochs: 8 optimizer steps on the tiny BERT, no files kept
RUN = {"schedule": {"epochs": 2, "batch_size": 4}, "output": {"save": False}, "eval": {"before": False, "restore_best": False}}


def train(tmp_path, method: dict, lr: float = 0.02, callbacks=()) -> tuple:
    result = run_training(tiny_config(tmp_path, method=method, optimizer={"lr": lr}, **RUN), callbacks=callbacks)
    return result, result.model


def sparse_counts(model) -> tuple[int, int, bool]:
    """(entries the adapter trains, candidate entries, whether any trained entry moved from zero)."""
    diffs = [diff for _, _, d in adapter_deltas(model, "default") if isinstance(d, SparseDelta) for _, diff in d.diffs()]
    assert all(d.selected for _, _, d in adapter_deltas(model, "default") if isinstance(d, SparseDelta))
    trained = sum(diff.values.numel() for diff in diffs)
    moved = any(diff.values.abs().max() > 0 for diff in diffs if diff.values.numel())
    return trained, sum(p.numel() for p in candidates(model, "default").values()), moved


@pytest.mark.parametrize("method", ["fishmask", "child_tuning_d", "fishdip"])
def test_fisher_mask_is_chosen_from_training_data_then_trained(tmp_path, method: str) -> None:
    extra = {"every": 3, "samples": 4} if method == "fishdip" else {}
    _, model = train(tmp_path, {"method": method, "targets": QV, "fraction": 0.01, **extra})
    trained, total, moved = sparse_counts(model)
    assert trained == round(0.01 * total) and moved  # the optimizer was made after the selection


def test_structured_units_are_chosen_before_training(tmp_path) -> None:
    _, model = train(tmp_path, {"method": "structured", "fraction": 0.5, "units": ["heads"]})
    trained, total, moved = sparse_counts(model)
    assert 0 < trained < total and moved


def test_adalora_total_step_comes_from_the_run_and_ranks_shrink(tmp_path) -> None:
    result, model = train(tmp_path, {"method": "adalora", "targets": QV, "init_r": 4, "target_r": 2})
    assert get_registry(model).require("default").total_step == result.steps == 8
    ranks = AdaLoRAController(model).ranks()
    assert sum(ranks.values()) == 2 * len(ranks)  # pruned from 4 per layer to the target budget by the last step


def test_adalora_without_total_step_outside_a_run_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="total_step is unset"):
        peftkit.attach(tiny_bert(2)[0], AdaLoRA(targets=QV))


def test_sora_proximal_step_zeroes_gates(tmp_path) -> None:
    _, model = train(tmp_path, {"method": "sora", "targets": QV, "r": 4}, lr=0.1)
    gates = torch.cat([d.gate.detach() for _, _, d in adapter_deltas(model, "default") if isinstance(d, SoRADelta)])
    assert (gates == 0).any() and (gates != 0).any()


class TrainRanks(Callback):
    """The rank DyLoRA's layers train at, after each step (user callbacks run after the method's steps)."""

    def __init__(self) -> None:
        self.ranks: list[int] = []

    def on_step_end(self, trainer) -> None:
        self.ranks += [d.train_rank for _, _, d in adapter_deltas(trainer.model, "default") if isinstance(d, DyLoRADelta)][:1]


def test_dylora_samples_a_new_rank_each_step(tmp_path) -> None:
    seen = TrainRanks()
    train(tmp_path, {"method": "dylora", "targets": QV, "r_min": 1, "r_max": 4}, callbacks=[seen])
    assert len(seen.ranks) == 8 and len(set(seen.ranks)) > 1 and set(seen.ranks) <= {1, 2, 3, 4}


class ExpectedL0(Callback):
    """The adapter's expected number of open gates after each step, while it still has gates."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_step_end(self, trainer) -> None:
        diffs = [diff for _, _, d in adapter_deltas(trainer.model, "default") if isinstance(d, SparseDelta)
                 for _, diff in d.diffs() if hasattr(diff, "expected_l0")]
        if diffs:
            self.values.append(sum(diff.expected_l0().item() for diff in diffs))


def test_diff_pruning_l0_penalty_enters_the_loss_then_the_projection_trains_a_fixed_mask(tmp_path) -> None:
    def run(weight: float) -> tuple[list[float], object]:
        seen = ExpectedL0()
        _, model = train(tmp_path / str(weight), {"method": "diff_pruning", "targets": QV, "l0_weight": weight,
                                                  "log_alpha_init": 0.0, "fraction": 0.01},  # gates half open
                         lr=0.1, callbacks=[seen])
        return seen.values, model

    penalised, model = run(1.0)
    free, _ = run(0.0)
    assert len(penalised) == len(free) == 3  # gated for the first half (4 of 8 steps), projected at the 4th
    assert penalised[-1] < 0.99 * free[-1]  # the same run: the penalty alone closes gates
    trained, total, moved = sparse_counts(model)
    assert trained == round(0.01 * total) and moved  # the kept values trained on after the projection


def test_ltsft_second_phase_trains_only_the_most_changed_entries(tmp_path) -> None:
    _, model = train(tmp_path, {"method": "ltsft", "targets": QV, "fraction": 0.01})
    trained, total, moved = sparse_counts(model)
    assert trained == round(0.01 * total) and moved  # phase 2 ran from a fresh optimizer over the new entries


def test_relora_restarts_merge_into_the_base(tmp_path) -> None:
    method = {"method": "relora", "targets": QV, "r": 2, "restart_every": 3}
    _, model = train(tmp_path, method)
    fresh = prepare(config_from_mapping(tiny_config(tmp_path, method=method, **RUN)))[0]  # the run's initial model
    host = "bert.encoder.layer.0.attention.self.query"
    assert not torch.equal(model.get_submodule(host).weight, fresh.get_submodule(host).weight)


class GroupRates(Callback):
    def on_train_begin(self, trainer) -> None:
        self.lrs = sorted(group["lr"] for group in trainer.optimizer.param_groups)


def test_loraplus_gives_the_optimizer_a_faster_group_for_b(tmp_path) -> None:
    seen = GroupRates()
    train(tmp_path, {"method": "loraplus", "targets": QV, "r": 2, "lr_ratio": 8.0}, callbacks=[seen])
    assert seen.lrs == [pytest.approx(0.02), pytest.approx(0.16)]


def test_fishdip_reselects_after_every_every_steps(tmp_path) -> None:
    steps = Steps()
    train(tmp_path, {"method": "fishdip", "targets": QV, "fraction": 0.01, "every": 3, "samples": 4}, callbacks=[steps])
    assert steps.at_reselection == [3, 6]  # of 8 steps: after the 3rd and the 6th


class Steps(Callback):
    """The step count at which each Fish-Dip re-selection happened (the method's step runs before this one)."""

    def __init__(self) -> None:
        self.at_reselection: list[int] = []
        self.count = 0

    def on_step_end(self, trainer) -> None:
        step = next(s for s in trainer.callbacks if type(s).__name__ == "Reselect")
        if step.schedule.reselections > self.count:
            self.count = step.schedule.reselections
            self.at_reselection.append(trainer.step)


def test_phase_change_refuses_a_run_that_stopped_before_it() -> None:
    from types import SimpleNamespace

    from peftkit.core.training import PhaseChange

    change = PhaseChange(at_step=5, change=lambda: None)
    change.on_train_end(SimpleNamespace(step=6))  # after the change: nothing to say
    with pytest.raises(ValueError, match="stopped at step 3, before the phase change at step 5"):
        change.on_train_end(SimpleNamespace(step=3))


def test_phase1_share_and_phase2_lr_scale_place_and_size_the_second_phase(tmp_path) -> None:
    seen = LearningRates()
    train(tmp_path, {"method": "ltsft", "targets": QV, "fraction": 0.01, "phase1_share": 0.25, "phase2_lr_scale": 10.0},
          callbacks=[seen])
    # 8 steps at lr 0.02, linear decay: the change after step 2 starts a fresh optimizer at 10 × 0.02 on a fresh
    # schedule over the 6 steps left
    assert seen.lrs[1] == pytest.approx(0.02) and seen.lrs[2] == seen.lrs[3] == pytest.approx(0.2)
    assert seen.lrs[4] == pytest.approx(0.2 * (1 - 1 / 6))


class LearningRates(Callback):
    """The optimizer's learning rate after each step's hooks (the step's own, or a fresh optimizer's)."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_step_end(self, trainer) -> None:
        self.lrs[trainer.step] = trainer.optimizer.param_groups[0]["lr"]
