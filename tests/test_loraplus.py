"""LoRA+: two optimizer groups that partition the adapter's trainable parameters, B at ratio·lr."""
from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import LoRA, LoRAFA, LoRAPlus, SoRA, loraplus_param_groups


def _ids(params) -> list[int]:
    return [id(p) for p in params]


def test_groups_partition_the_trainable_parameters_with_the_right_lrs(tiny) -> None:
    peftkit.attach(tiny, LoRA(r=4, targets="all-linear", exclude=["head"], modules_to_save=["head"]))
    slow, fast = loraplus_param_groups(tiny, "default", lr=1e-3, weight_decay=0.01)
    named = dict(tiny.named_parameters())
    b_factors = [p for n, p in named.items() if n.endswith("lora_B")]
    trainable = [p for p in named.values() if p.requires_grad]
    assert sorted(_ids(slow["params"]) + _ids(fast["params"])) == sorted(_ids(trainable))  # nothing missing or twice
    assert sorted(_ids(fast["params"])) == sorted(_ids(b_factors)) and len(b_factors) == 5
    assert any(n.startswith("head.peftkit") for n, p in named.items() if id(p) in set(_ids(slow["params"])))
    assert fast["lr"] == pytest.approx(16e-3) and slow["lr"] == 1e-3
    assert slow["weight_decay"] == fast["weight_decay"] == 0.01


def test_ratio_survives_a_scheduler_and_only_the_named_adapter_is_included(tiny) -> None:
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "v"]), "a")
    peftkit.attach(tiny, SoRA(r=2, targets=["k"]), "b")
    groups = loraplus_param_groups(tiny, "b", lr=0.5, ratio=4.0)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in peftkit.adapter_parameters(tiny, "b")}
    optimizer = torch.optim.AdamW(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    optimizer.step()
    schedule.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 1.0]


def test_lorafa_has_only_b_and_errors_name_the_argument(tiny) -> None:
    peftkit.attach(tiny, LoRAFA(r=2, targets=["q"]))
    groups = loraplus_param_groups(tiny, "default", lr=1e-3)
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(16e-3)  # A is frozen: no slow group
    for kwargs, field in [({"lr": 0.0}, "lr"), ({"lr": 1.0, "ratio": -1.0}, "ratio"),
                          ({"lr": 1.0, "weight_decay": -0.1}, "weight_decay")]:
        with pytest.raises(ValueError, match=field):
            loraplus_param_groups(tiny, "default", **kwargs)
    peftkit.set_trainable(tiny, "default", False)
    with pytest.raises(ValueError, match="no trainable lora_B"):
        loraplus_param_groups(tiny, "default", lr=1e-3)


def test_loraplus_learns_bbc() -> None:
    from .bbc import LEARNS, fit_bbc

    # LoRA+ as a method: the trainer's optimizer gets B at 16 × 1e-3, the rest (the head copy too) at 1e-3
    result, model, _ = fit_bbc(LoRAPlus(r=8, alpha=16, targets=["query", "value"], lr_ratio=16), lr=1e-3)
    assert result.accuracy_after > LEARNS
    head = model.classifier.peftkit["default"].module.weight
    assert not torch.equal(head, model.classifier.weight)  # the head copy is in the slow group and trains too
