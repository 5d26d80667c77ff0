"""SoRA: gated formula, proximal step, pruning at save (rank shrinks, outputs unchanged), merge, routing, learning."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import LoRA, SoRA, sora_proximal_step, sora_prune
from peftkit.methods.reparameterized.sora import SoRADelta

from .bbc import LEARNS, bbc_inputs, fit_bbc
from .conftest import randomize
from .checks import assert_routed_matches_rows


def _gates(model: nn.Module, name: str = "default") -> dict[str, nn.Parameter]:
    slots = {n: m.peftkit for n, m in model.named_modules() if hasattr(m, "peftkit") and name in m.peftkit}
    return {n: slot[name].gate for n, slot in slots.items() if isinstance(slot[name], SoRADelta)}  # not head copies


def _zero_some_gates(model: nn.Module) -> None:
    """Two components off everywhere, all of them on ffn.0 (a layer pruned to rank 0)."""
    with torch.no_grad():
        for host, gate in _gates(model).items():
            gate[:2] = 0.0
            if host == "ffn.0":
                gate.zero_()


def test_forward_matches_formula() -> None:
    model = nn.Sequential(nn.Linear(12, 7))
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.attach(model, SoRA(r=4, alpha=6, targets=["0"]))
    randomize(model)
    d = model[0].peftkit["default"]
    x = torch.randn(3, 5, 12)
    expected = x @ w0.T + b0 + 1.5 * (((x @ d.lora_A.T) * d.gate) @ d.lora_B.T)  # W0 x + s·B(g ⊙ Ax), s = 6/4
    torch.testing.assert_close(model(x), expected)
    with torch.no_grad():
        d.gate[1] = 0.0  # the gate really gates: component 1 drops out
    keep = torch.tensor([0, 2, 3])
    kept = ((x @ d.lora_A[keep].T) * d.gate[keep]) @ d.lora_B[:, keep].T
    torch.testing.assert_close(model(x), x @ w0.T + b0 + 1.5 * kept)


def test_fresh_adapter_is_exact_noop(tiny, ids) -> None:
    before = tiny(ids)
    peftkit.attach(tiny, SoRA(r=4, targets="all-linear"))
    assert torch.equal(tiny(ids), before)


def test_merge_equals_unmerged(tiny, ids) -> None:
    w0 = tiny.attn["q"].weight.detach().clone()
    peftkit.attach(tiny, SoRA(r=4, alpha=8, targets="all-linear"))
    randomize(tiny)
    _zero_some_gates(tiny)
    unmerged = tiny(ids)
    peftkit.merge(tiny)
    torch.testing.assert_close(tiny(ids), unmerged, rtol=1e-5, atol=1e-5)
    peftkit.unmerge(tiny)
    torch.testing.assert_close(tiny.attn["q"].weight, w0, rtol=0, atol=1e-6)


def test_proximal_step_soft_thresholds_the_gates(tiny) -> None:
    peftkit.attach(tiny, SoRA(r=4, targets=["q", "v"]))
    gates = _gates(tiny)
    with torch.no_grad():
        for gate in gates.values():
            gate.copy_(torch.tensor([0.5, -0.1, 0.15, -0.7]))
    alive = sora_proximal_step(tiny, "default", lr=0.1, lam=2.0)  # threshold 0.2
    for gate in gates.values():
        torch.testing.assert_close(gate.detach(), torch.tensor([0.3, 0.0, 0.0, -0.5]))
    assert alive == 2 * len(gates)
    with pytest.raises(ValueError, match="lam"):
        sora_proximal_step(tiny, "default", lr=0.1, lam=-1.0)
    with pytest.raises(ValueError, match="lr"):
        sora_proximal_step(tiny, "default", lr=-0.1, lam=1.0)


def test_pruning_at_save_shrinks_the_rank_and_keeps_outputs(tiny, ids, tmp_path) -> None:
    base = copy.deepcopy(tiny)
    peftkit.attach(tiny, SoRA(r=4, alpha=8, targets="all-linear"))
    randomize(tiny)
    _zero_some_gates(tiny)
    before = tiny(ids)
    peftkit.save(tiny, tmp_path / "sora")
    saved = load_file(str(tmp_path / "sora" / "adapter.safetensors"))
    assert saved["attn.q.lora_A"].shape == (2, 16) and saved["attn.q.lora_B"].shape == (16, 2)
    assert saved["ffn.0.gate"].shape == (0,)
    peftkit.load(base, tmp_path / "sora")
    assert {n: g.shape[0] for n, g in _gates(base).items()} == {n: 0 if n == "ffn.0" else 2 for n in _gates(tiny)}
    torch.testing.assert_close(base(ids), before, rtol=1e-5, atol=1e-6)
    ranks = sora_prune(tiny, "default")  # the same in place
    assert ranks == {n: g.shape[0] for n, g in _gates(base).items()}
    torch.testing.assert_close(tiny(ids), before, rtol=1e-5, atol=1e-6)
    peftkit.merge(tiny)  # a pruned (even rank-0) adapter still merges
    torch.testing.assert_close(tiny(ids), before, rtol=1e-5, atol=1e-5)


def test_load_rejects_a_file_with_more_components_than_r(tiny, tmp_path) -> None:
    base = copy.deepcopy(tiny)
    peftkit.attach(tiny, SoRA(r=4, targets=["q"]))
    peftkit.save(tiny, tmp_path / "r4")
    meta = tmp_path / "r4" / "peftkit_adapter.json"
    meta.write_text(meta.read_text().replace('"r": 4', '"r": 2'))
    with pytest.raises(peftkit.AdapterFileError, match=r"lora_A has shape \(4, 16\) in the file but \(2, 16\)"):
        peftkit.load(base, tmp_path / "r4")


def test_mixed_batch_with_lora_and_base_rows_equals_rows_alone(tiny, ids) -> None:
    peftkit.attach(tiny, SoRA(r=4, targets=["q", "v", "ffn.0"]), "sora")
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "k"]), "lora")
    randomize(tiny)
    with torch.no_grad():
        tiny.attn["q"].peftkit["sora"].gate[0] = 0.0
    sora_prune(tiny, "sora")  # layers of different ranks
    rows = ["sora", "lora", None, "sora", None, "lora"]
    assert_routed_matches_rows(tiny, ids, rows)


@pytest.mark.parametrize(("kwargs", "field"), [({"r": 0}, "r"), ({"alpha": -1}, "alpha"),
                                               ({"dropout": 1.0}, "dropout"), ({"rank": 4}, "rank")])
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SoRA(targets=["q"], **kwargs)


def test_sora_learns_bbc_and_prunes_gates(tmp_path) -> None:
    """The method's own training step (the proximal step on the gates at the run's lr) runs in fit_bbc."""
    result, model, _ = fit_bbc(SoRA(r=8, alpha=16, targets=["query", "value"]), lr=3e-3)
    assert result.accuracy_after > LEARNS
    alive = sum(int(g.count_nonzero()) for g in _gates(model).values())
    total = sum(g.numel() for g in _gates(model).values())
    print(f"sora: {alive} of {total} gates left")
    assert alive < total  # the proximal step switched components off
    from peftkit.models import load_minilm

    peftkit.save(model, tmp_path / "sora")
    fresh, _ = load_minilm(num_labels=5)
    peftkit.load(fresh, tmp_path / "sora")
    assert sum(g.numel() for g in _gates(fresh).values()) == alive
    x = bbc_inputs(16)
    model.eval()
    fresh.eval()
    with torch.inference_mode():
        torch.testing.assert_close(fresh(**x).logits, model(**x).logits, rtol=1e-4, atol=1e-5)
