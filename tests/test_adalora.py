"""AdaLoRA: the SVD-form formula, the rank schedule and its scores (against HF PEFT's allocator), the
orthogonality regularizer, routing, saving the pruned ranks, PEFT interop both ways, and learning."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import AdaLoRA, AdaLoRAController, LoRA

from .bbc import LEARNS, fit_bbc
from .checks import assert_merge_roundtrip, assert_routed_matches_rows
from .conftest import randomize

TINY_TARGETS = ["q", "k", "v", "ffn.0", "ffn.2"]
pytestmark = [  # PEFT's own noise, raised for the files PEFT itself writes too
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match"),
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape"),
]


def _config(**kwargs) -> AdaLoRA:
    return AdaLoRA(**{"init_r": 4, "target_r": 2, "alpha": 6, "total_step": 20, "targets": TINY_TARGETS, **kwargs})


def _train(model: nn.Module, controller: AdaLoRAController, inputs, steps: range, lr: float = 1e-2) -> list[int]:
    """A few real steps on a squared-output loss; returns the total kept rank after each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    totals = []
    for step in steps:
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        (getattr(out, "logits", out).square().mean() + controller.regularizer()).backward()
        opt.step()
        controller.update(step)
        opt.zero_grad(set_to_none=True)
        totals.append(sum(controller.ranks().values()))
    return totals


# --- the formula ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["linear", "conv1d"])
def test_forward_matches_formula(host: str) -> None:
    model = nn.Sequential(nn.Linear(12, 7) if host == "linear" else Conv1D(7, 12))
    w0 = model[0].weight.detach().clone() if host == "linear" else model[0].weight.detach().T.clone()  # [out, in]
    b0 = model[0].bias.detach().clone()
    peftkit.attach(model, _config(targets=["0"]))
    randomize(model)
    d = model[0].peftkit["default"]
    p, lam, q = d.lora_B, d.lora_E[:, 0], d.lora_A  # P [7, 4], Λ [4], Q [4, 12]
    x = torch.randn(4, 3, 12)
    expected = x @ w0.T + b0 + 6 / (4 + 1e-5) * x @ (p @ torch.diag(lam) @ q).T  # W0 x + α/r · P Λ Q x
    torch.testing.assert_close(model(x), expected)
    assert not torch.allclose(model(x), x @ w0.T + b0, atol=1e-3)


def test_init_follows_peft_and_is_an_exact_noop(tiny, ids) -> None:
    before = tiny(ids)
    peftkit.attach(tiny, _config(init_r=64))
    d = tiny.ffn[0].peftkit["default"]
    assert torch.equal(d.lora_E, torch.zeros(64, 1))
    for factor in (d.lora_A, d.lora_B):  # N(0, 0.02²)
        assert abs(factor.std().item() - 0.02) < 0.002 and abs(factor.mean().item()) < 0.002
    assert torch.equal(tiny(ids), before)


def test_merge_unmerge_roundtrip(tiny, ids) -> None:
    peftkit.attach(tiny, _config())
    randomize(tiny)
    assert_merge_roundtrip(tiny, ids, "ffn.0.weight")


def test_mixed_routed_batch_equals_rows_alone(tiny, ids) -> None:
    peftkit.attach(tiny, _config(), "ada")
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "v", "ffn.2"]), "lora")
    randomize(tiny)
    tiny.eval()
    assert_routed_matches_rows(tiny, ids, ["ada", "lora", None, "ada", None, "lora"])


# --- the schedule and the regularizer -----------------------------------------------------------------------------

def test_budget_follows_the_cubic_schedule() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    peftkit.attach(model, _config(targets=["0", "1"], total_step=20, tinit=3, tfinal=5))
    controller = AdaLoRAController(model)
    # init 2·4 = 8, target 2·2 = 4, budgeting from step 3 to 15: 4 + 4·(1 − (t − 3)/12)³, truncated
    expected = {0: 8, 3: 8, 4: 7, 6: 5, 9: 4 + int(4 * 0.125), 14: 4, 15: 4, 19: 4}
    assert {t: controller.budget(t) for t in expected} == expected


def test_schedule_prunes_to_the_budget_across_layers(tiny, ids) -> None:
    config = _config(total_step=20, tinit=3, tfinal=5, deltaT=2)
    peftkit.attach(tiny, config)
    controller = AdaLoRAController(tiny)
    assert controller.ranks() == dict.fromkeys(["attn.q", "attn.k", "attn.v", "ffn.0", "ffn.2"], 4)
    totals = _train(tiny, controller, ids, range(20))
    for step, total in enumerate(totals):
        if step <= 3:
            assert total == 20, step  # warm-up: nothing pruned
        elif step <= 15 and step % 2 == 0:
            assert total == controller.budget(step), step  # each allocation keeps exactly the budget
    assert totals[15:] == [2 * 5] * 5  # target_r × layers, frozen in the final phase
    ranks = controller.ranks()
    assert len(set(ranks.values())) > 1, f"the budget should be spread unevenly across layers: {ranks}"
    for host, delta in controller.deltas.items():  # pruned singular values are exactly zero, kept ones are not
        assert torch.all(delta.lora_E[~delta.rank_mask] == 0) and torch.all(delta.lora_E[delta.rank_mask] != 0), host


def test_orthogonality_regularizer_by_hand(tiny) -> None:
    peftkit.attach(tiny, _config(orth_reg_weight=0.3))
    randomize(tiny)
    controller = AdaLoRAController(tiny)
    eye = torch.eye(4)
    terms = []
    for host in TINY_TARGETS:
        d = tiny.get_submodule(f"attn.{host}" if host in "qkv" else host).peftkit["default"]
        p, q = d.lora_B, d.lora_A
        terms.append(torch.linalg.matrix_norm(p.T @ p - eye) ** 2 + torch.linalg.matrix_norm(q @ q.T - eye) ** 2)
    torch.testing.assert_close(controller.regularizer(), 0.3 * sum(terms) / len(terms))
    with torch.no_grad():  # orthonormal P columns and Q rows: no penalty
        for d in controller.deltas.values():
            d.lora_B.copy_(torch.linalg.qr(torch.randn(d.lora_B.shape))[0])
            d.lora_A.copy_(torch.linalg.qr(torch.randn(d.lora_A.shape[1], 4))[0].T)
    assert controller.regularizer().item() < 1e-10


# --- saving the ranks ---------------------------------------------------------------------------------------------

def test_pruned_adapter_round_trip_is_exact(tiny, ids, tmp_path: Path) -> None:
    fresh = copy.deepcopy(tiny)
    peftkit.attach(tiny, _config(total_step=10, tinit=1, tfinal=2))
    controller = AdaLoRAController(tiny)
    _train(tiny, controller, ids, range(10))
    trained = tiny(ids)
    peftkit.save(tiny, tmp_path / "ada")
    peftkit.load(fresh, tmp_path / "ada")
    assert torch.equal(fresh(ids), trained)
    assert AdaLoRAController(fresh).ranks() == controller.ranks() and sum(controller.ranks().values()) == 10


# --- bad inputs ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"target_r": 5}, "target_r=5 is a budget larger than the total rank init_r=4"), ({"init_r": 0}, "init_r"),
     ({"tinit": 12, "tfinal": 8}, "tinit \\+ tfinal"), ({"beta1": 1.0}, "beta1"), ({"beta2": 0.0}, "beta2"),
     ({"deltaT": 0}, "deltaT"), ({"orth_reg_weight": -1}, "orth_reg_weight"), ({"total_step": 0}, "total_step"),
     ({"rank": 3}, "rank")],
)
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _config(**kwargs)


def test_controller_misuse_is_a_named_error(tiny, ids) -> None:
    peftkit.attach(tiny, LoRA(targets=["q"]), "plain")
    with pytest.raises(TypeError, match="'plain' is lora, not adalora"):
        AdaLoRAController(tiny, "plain")
    peftkit.attach(tiny, _config())
    controller = AdaLoRAController(tiny)
    tiny(ids).sum().backward()
    tiny.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="before zero_grad"):
        controller.update(0)


# --- HF PEFT: the same allocation, and files both ways -----------------------------------------------------------

try:
    import peft
except ImportError:  # pragma: no cover
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="needs the peft package")
PEFT_ARGS = {"init_r": 6, "target_r": 2, "lora_alpha": 8, "target_modules": ["query", "value"], "total_step": 10,
             "tinit": 1, "tfinal": 2, "orth_reg_weight": 0.0}  # no penalty: PEFT's (unsquared norms) differs from ours


def _bert() -> nn.Module:
    torch.manual_seed(1)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _randomize_factors(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn_like(p))


def _step_peft(model: nn.Module, inputs: dict, steps: range) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in steps:
        model(**inputs).logits.square().mean().backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@needs_peft
def test_training_in_lockstep_with_peft(tmp_path: Path) -> None:
    """Same start, same optimizer steps: the same kept triplets as PEFT's RankAllocator, and the same outputs."""
    inputs = {"input_ids": torch.randint(1, 100, (4, 7))}
    model = peft.get_peft_model(_bert(), peft.AdaLoraConfig(**PEFT_ARGS))
    model.save_pretrained(tmp_path)  # the untrained start
    ours = _bert()
    peftkit.load(ours, tmp_path)
    torch.testing.assert_close(_logits(ours, inputs), _logits(model, inputs))
    _step_peft(model, inputs, range(10))
    _train(ours, AdaLoRAController(ours), inputs, range(10))
    pattern = {k.removesuffix(".lora_E.default"): v for k, v in model.peft_config["default"].rank_pattern.items()}
    ours_pattern = {h: d.rank_mask.tolist() for h, d in AdaLoRAController(ours).deltas.items()}
    assert ours_pattern == pattern and sum(map(sum, pattern.values())) == 2 * 4
    torch.testing.assert_close(_logits(ours, inputs), _logits(model, inputs), atol=1e-5, rtol=1e-4)


@needs_peft
def test_scores_match_peft_on_the_same_gradients(tmp_path: Path) -> None:
    """Random factors and gradients of one scale, fed to both: every allocation keeps the same triplets."""
    args = {**PEFT_ARGS, "target_modules": ["query", "key", "value", "dense"], "total_step": 12, "tinit": 2,
            "tfinal": 3, "deltaT": 2, "beta1": 0.8, "beta2": 0.6}
    model = peft.get_peft_model(_bert(), peft.AdaLoraConfig(**args))
    _randomize_factors(model)
    model.save_pretrained(tmp_path)
    ours = _bert()
    peftkit.load(ours, tmp_path)
    controller = AdaLoRAController(ours)
    params = dict(model.named_parameters())
    for step in range(12):
        for host, delta in controller.deltas.items():
            for name in ("lora_A", "lora_B", "lora_E"):
                grad = torch.randn_like(getattr(delta, name))
                getattr(delta, name).grad = grad
                params[f"base_model.model.{host}.{name}.default"].grad = grad.clone()
        model.base_model.update_and_allocate(step)
        controller.update(step)
        pattern = model.peft_config["default"].rank_pattern
        if pattern:
            assert {k.removesuffix(".lora_E.default"): v for k, v in pattern.items()} == \
                {h: d.rank_mask.tolist() for h, d in controller.deltas.items()}, step
    assert sum(controller.ranks().values()) == 2 * len(controller.deltas)


@needs_peft
def test_peft_pruned_adapter_loads_with_same_outputs(tmp_path: Path) -> None:
    inputs = {"input_ids": torch.randint(1, 100, (3, 7))}
    model = peft.get_peft_model(_bert(), peft.AdaLoraConfig(**PEFT_ARGS))
    _step_peft(model, inputs, range(10))
    model.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    kept = {k: sum(v) for k, v in json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"].items()}
    assert {k: saved[f"base_model.model.{k}"].shape[0] for k in kept} == kept  # PEFT drops the pruned triplets
    expected, bare = _logits(model.eval(), inputs), _logits(_bert(), inputs)
    assert not torch.allclose(expected, bare, atol=1e-4)
    ours = _bert()
    peftkit.load(ours, tmp_path)
    torch.testing.assert_close(_logits(ours, inputs), expected, atol=1e-5, rtol=1e-5)
    assert AdaLoRAController(ours).ranks() == {k.removesuffix(".lora_E"): v for k, v in kept.items()}


@needs_peft
def test_our_pruned_adapter_loads_in_peft_with_same_outputs(tmp_path: Path) -> None:
    inputs = {"input_ids": torch.randint(1, 100, (3, 7))}
    ours = _bert()
    peftkit.attach(ours, AdaLoRA(init_r=6, target_r=2, alpha=8, targets=["query", "value"], total_step=10,
                                 tinit=1, tfinal=2, modules_to_save=["classifier"]))
    controller = AdaLoRAController(ours)
    _train(ours, controller, inputs, range(10))
    expected = _logits(ours, inputs)
    peftkit.save(ours, tmp_path, format="peft")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "ADALORA" and meta["init_r"] == 6
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in meta["rank_pattern"].items()} == controller.ranks()
    loaded = peft.PeftModel.from_pretrained(_bert(), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, inputs), expected, atol=1e-5, rtol=1e-5)
    back = _bert()
    peftkit.load(back, tmp_path)  # and back into peftkit
    torch.testing.assert_close(_logits(back, inputs), expected, atol=1e-6, rtol=1e-6)
    assert AdaLoRAController(back).ranks() == controller.ranks()


# --- learning -----------------------------------------------------------------------------------------------------

def test_adalora_learns_bbc() -> None:
    config = AdaLoRA(init_r=8, target_r=4, alpha=16, targets=["query", "value"], total_step=40, tinit=5,
                     tfinal=10, deltaT=5, orth_reg_weight=0.1)
    # the rank allocation and the orthogonality regularizer are the method's own training steps
    result, model, _ = fit_bbc(config, lr=1e-2, epochs=2)
    ranks = AdaLoRAController(model).ranks()
    print(f"adalora ranks per layer: {sorted(ranks.values())}")
    assert result.steps == config.total_step and sum(ranks.values()) == 4 * len(ranks)
    assert result.accuracy_after > LEARNS
