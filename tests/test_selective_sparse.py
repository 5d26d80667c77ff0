"""The shared selective machinery: sparse / dense-block deltas, exact top-fraction masks, Fisher by hand,
merge, files, routing, and training that cannot move anything outside the mask."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import IA3, BitFit, FishMask, LoRA, Mask, MaskError, MaskNotSelectedError, NoDataError, PaFi, SelectionError
from peftkit.methods.selective.selection import fisher_scores, install_masks, top_fraction
from peftkit.methods.selective.folding import folds_into_weight
from peftkit.methods.selective.products import SPARSE_MAX_DENSITY
from peftkit.methods.selective.sparse import SparseDelta

from .checks import assert_merge_roundtrip, assert_routed_grads_match_rows, assert_routed_matches_rows
from .conftest import randomize

ALL = ["embed", "q", "k", "v", "ffn.0", "ffn.2"]


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".peftkit." not in n}


# --- masks from scores -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.37, 1.0])
def test_top_fraction_selects_exactly_the_fraction_of_the_highest_scores(fraction: float) -> None:
    scores = {"a.weight": torch.randn(7, 9), "a.bias": torch.randn(7), "b.weight": torch.randn(30)}
    flat = torch.cat([s.flatten() for s in scores.values()]).sort().values  # distinct almost surely
    count = max(1, round(fraction * flat.numel()))
    for largest, expected in ((True, flat[-count:]), (False, flat[:count])):
        masks = top_fraction(scores, fraction, largest=largest)
        chosen = torch.cat([scores[k].flatten()[m.indices] for k, m in masks.items()])
        assert torch.equal(chosen.sort().values, expected)  # exactly `count` entries, the global top (or bottom)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_fraction_outside_unit_interval_is_a_named_error(tiny, fraction: float) -> None:
    with pytest.raises(SelectionError, match="fraction must be in"):
        top_fraction({"a": torch.ones(3)}, fraction)
    with pytest.raises(ValidationError, match="fraction"):
        PaFi(targets=["q"], fraction=fraction)
    with pytest.raises(ValidationError, match="fraction"):
        FishMask(targets=["q"], fraction=fraction)


# --- Fisher by hand ----------------------------------------------------------------------------------------------

def _softmax_regression() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    model = nn.Sequential(nn.Linear(4, 3))
    batches = [(torch.randn(3, 4), torch.tensor([0, 2, 1])), (torch.randn(2, 4), torch.tensor([1, 1]))]
    return model, batches


def test_fisher_per_example_equals_the_hand_formula() -> None:
    """Linear + softmax: ∂(−log p_y)/∂W = (p − e_y) xᵀ, ∂/∂b = p − e_y; F̂ = mean over the 5 examples of its square."""
    model, batches = _softmax_regression()
    peftkit.attach(model, FishMask(targets=["0"], fraction=0.5))
    w, b = model[0].weight.detach(), model[0].bias.detach()
    grads_w, grads_b = [], []
    for x, y in batches:
        for xi, yi in zip(x, y):
            err = torch.softmax(w @ xi + b, -1) - F.one_hot(yi, 3).float()
            grads_w.append(torch.outer(err, xi))
            grads_b.append(err)
    scores = fisher_scores(model, "default", batches)
    torch.testing.assert_close(scores["0.weight"], torch.stack(grads_w).square().mean(0))
    torch.testing.assert_close(scores["0.bias"], torch.stack(grads_b).square().mean(0))


def test_fisher_per_batch_squares_each_batch_mean_gradient() -> None:
    model, batches = _softmax_regression()
    peftkit.attach(model, FishMask(targets=["0"], fraction=0.5))
    w, b = model[0].weight.detach(), model[0].bias.detach()
    batch_grads = []
    for x, y in batches:
        err = torch.softmax(x @ w.T + b, -1) - F.one_hot(y, 3).float()  # [B, 3]
        batch_grads.append(err.T @ x / len(y))  # gradient of the batch's mean loss
    scores = fisher_scores(model, "default", batches, per_example=False)
    torch.testing.assert_close(scores["0.weight"], torch.stack(batch_grads).square().mean(0))
    assert not torch.allclose(scores["0.weight"], fisher_scores(model, "default", batches)["0.weight"])


def test_fisher_of_a_selected_adapter_is_taken_at_the_changed_weights() -> None:
    """Fish-Dip re-selects at W0 + ΔW: the gradient of the base weight flows though batches are big enough to fold."""
    model, batches = _softmax_regression()
    peftkit.attach(model, FishMask(targets=["0"], fraction=0.5))
    install_masks(model, "default", {"0.weight": Mask.elements(torch.tensor([0, 5, 11])), "0.bias": Mask.whole()})
    randomize(model)
    delta = model[0].peftkit["default"]
    w, b = model[0].weight + delta.weight.dense().detach(), model[0].bias + delta.bias.dense().detach()
    batch_grads = []
    for x, y in batches:
        assert folds_into_weight(len(y), w.shape)
        err = torch.softmax(x @ w.T + b, -1) - F.one_hot(y, 3).float()
        batch_grads.append(err.T @ x / len(y))
    scores = fisher_scores(model, "default", batches, per_example=False)
    torch.testing.assert_close(scores["0.weight"], torch.stack(batch_grads).square().mean(0))


def test_fisher_is_taken_in_eval_mode_and_leaves_the_model_as_it_was(tiny, ids) -> None:
    tiny.ffn.insert(1, nn.Dropout(0.5))
    peftkit.attach(tiny, FishMask(targets=["ffn.0"], fraction=0.1, modules_to_save=["head"]))
    tiny.train()
    batch = (ids, torch.tensor([0, 1, 2, 0, 1, 2]))
    first, second = (fisher_scores(tiny, "default", [batch])["ffn.0.weight"] for _ in range(2))
    assert torch.equal(first, second)  # no dropout noise
    assert tiny.training and not tiny.ffn[0].weight.requires_grad and tiny.head.peftkit["default"].module.weight.requires_grad


def test_fisher_with_no_data_and_select_on_a_rule_method_are_named_errors(tiny) -> None:
    peftkit.attach(tiny, FishMask(targets=["q"]), "fish")
    with pytest.raises(NoDataError, match="at least one example"):
        peftkit.select(tiny, "fish", [])
    peftkit.attach(tiny, BitFit(targets=["k"]), "bias")
    with pytest.raises(SelectionError, match="chooses its parameters when attached"):
        peftkit.select(tiny, "bias", [(torch.zeros(1, 5, dtype=torch.long), torch.tensor([0]))])


def test_unselected_adapter_refuses_to_run(tiny, ids) -> None:
    peftkit.attach(tiny, FishMask(targets=["q"]))
    with pytest.raises(MaskNotSelectedError, match="peftkit.select"):
        tiny(ids)


# --- the layer: formula on every host kind, sparse and dense paths -----------------------------------------------

def _hosts() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    conv1d = Conv1D(6, 8)
    nn.init.normal_(conv1d.weight)
    ln = nn.LayerNorm(8)
    nn.init.normal_(ln.weight)
    return {
        "linear": (nn.Linear(8, 6), torch.randn(4, 3, 8)),
        "conv1d": (conv1d, torch.randn(4, 3, 8)),
        "conv2d": (nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"), torch.randn(2, 4, 5, 5)),
        "embedding": (nn.Embedding(10, 6, padding_idx=0), torch.randint(0, 10, (4, 3))),
        "layernorm": (ln, torch.randn(4, 3, 8)),
    }


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding", "layernorm"])
@pytest.mark.parametrize("share", [0.05, 0.9])  # few entries: sparse products (Linear, Conv1D); many: one dense matmul
def test_output_is_the_host_with_weights_plus_the_sparse_change(kind: str, share: float) -> None:
    host, x = _hosts()[kind]
    expected_host = copy.deepcopy(host)
    model = nn.Sequential(host)
    peftkit.attach(model, PaFi(targets=["0"], fraction=share))
    delta = host.peftkit["default"]
    randomize(model)
    with torch.no_grad():
        expected_host.weight += delta.weight.dense()
    torch.testing.assert_close(model(x), expected_host(x))
    assert delta.weight.indices.numel() == max(1, round(share * host.weight.numel()))


def test_slices_and_dense_blocks_follow_the_same_formula() -> None:
    host, x = _hosts()["linear"]
    expected_host = copy.deepcopy(host)
    model = nn.Sequential(host)
    peftkit.attach(model, FishMask(targets=["0"]))
    install_masks(model, "default", {"0.weight": Mask.slices(0, torch.tensor([4, 1])), "0.bias": Mask.whole()})
    randomize(model)
    delta = host.peftkit["default"]
    assert delta.weight.indices.tolist() == [1, 4] and delta.weight.values.shape == (2, 8) and delta.bias.indices is None and delta.bias.values.shape == (6,)
    with torch.no_grad():
        expected_host.weight[[1, 4]] += delta.weight.values  # indices are kept sorted
        expected_host.bias += delta.bias.values
    torch.testing.assert_close(model(x), expected_host(x))
    assert_merge_roundtrip(model, x, "0.weight")


def _folded(out: torch.Tensor) -> bool:
    """Whether the host's output came from a folded call (the host's output is a view of it)."""
    return any(type(fn).__name__ == "FoldedCallBackward" for fn, _ in out.grad_fn.next_functions)


def _with_dense_delta(host: nn.Module, delta_weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The host run on W0 + ΔW as one weight (Conv1D keeps it as (in, out))."""
    weight = host.weight + delta_weight
    return F.linear(x, weight, host.bias) if isinstance(host, nn.Linear) else x @ weight + host.bias


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("form", ["elements", "frozen elements", "rows", "columns"])
@pytest.mark.parametrize("count", [20, 38])  # elements: up to min(in, out) = 24 take the per-entry product, more the sparse products
def test_sparse_products_and_slices_equal_the_dense_delta_formula(kind: str, form: str, count: int) -> None:
    """Output, input gradient and gradient of `values` of each fast path equal those of f(x; W0 + ΔW)."""
    host = nn.Linear(32, 24) if kind == "linear" else Conv1D(24, 32)
    model = nn.Sequential(host)
    peftkit.attach(model, FishMask(targets=["0"]))
    n = host.weight.numel()
    chosen = torch.randperm(n)
    mask = {"rows": Mask.slices(0, torch.tensor([1, 4, 9])), "columns": Mask.slices(1, torch.tensor([0, 5, 6, 20]))}.get(
        form, Mask.elements(chosen[:count]))
    install_masks(model, "default", {"0.weight": mask})
    diff = host.peftkit["default"].weight
    randomize(model)
    x = torch.randn(4, 3, 32, requires_grad=True)
    if form == "frozen elements":  # Fish-Dip: entries dropped from the mask keep a frozen change
        model(x)  # the sparse layout is built without them first, so it must be rebuilt
        diff.frozen_indices, diff.frozen_values = chosen[-4:], torch.randn(4)
    if diff.is_elements:
        assert diff.size() <= SPARSE_MAX_DENSITY * n  # not the dense fallback
        assert (diff.size() > 24) == (count == 38)  # which of the two element paths runs
    assert not folds_into_weight(12, host.weight.shape)  # these 12 rows take the output hook's paths
    out = model(x)
    assert not _folded(out)
    grad = torch.randn_like(out)
    expected = _with_dense_delta(host, diff.dense(), x)
    torch.testing.assert_close(out, expected)
    for got, want in zip(torch.autograd.grad(out, (x, diff.values), grad), torch.autograd.grad(expected, (x, diff.values), grad)):
        torch.testing.assert_close(got, want)


_FOLD_MASKS = {  # dV of element masks by the output hook's rules: per entry up to min(in, out) = 24, sampled at the
    # mask up to 10% of the 768 entries, else dense gᵀx, gathered
    "few elements": {"0.weight": Mask.elements(torch.arange(0, 760, 40))},  # 19 entries: per entry
    "sparse elements": {"0.weight": Mask.elements(torch.arange(0, 760, 20))},  # 38: sampled
    "dense elements": {"0.weight": Mask.elements(torch.arange(0, 760, 3))},  # 254: dense gradient, gathered
    "frozen elements": {"0.weight": Mask.elements(torch.arange(0, 760, 20))},
    "rows": {"0.weight": Mask.slices(0, torch.tensor([1, 4, 9]))},
    "columns": {"0.weight": Mask.slices(1, torch.tensor([0, 5, 6, 20]))},
    "whole and bias elements": {"0.weight": Mask.whole(), "0.bias": Mask.elements(torch.tensor([2, 3]))},
    "bias only": {"0.bias": Mask.whole()},
}


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("form", list(_FOLD_MASKS))
def test_a_folded_host_call_equals_the_formula_in_value_and_gradients(kind: str, form: str) -> None:
    """A training-size batch runs the host once on W0 + ΔW: output, dx, dV and dΔb equal those of f(x; W0 + ΔW, b0 + Δb)."""
    host = nn.Linear(32, 24) if kind == "linear" else Conv1D(24, 32)
    model = nn.Sequential(host)
    peftkit.attach(model, FishMask(targets=["0"]))
    install_masks(model, "default", _FOLD_MASKS[form])
    delta = host.peftkit["default"]
    randomize(model)
    x = torch.randn(8, 16, 32, requires_grad=True)
    if form == "frozen elements":
        delta.weight.frozen_indices, delta.weight.frozen_values = torch.tensor([1, 2, 701]), torch.randn(3)
    assert folds_into_weight(128, host.weight.shape)
    out = model(x)
    assert _folded(out)
    weight, bias = host.weight + delta.weight.dense(), host.bias + delta.bias.dense()
    expected = F.linear(x, weight, bias) if kind == "linear" else x @ weight + bias
    torch.testing.assert_close(out, expected)
    trained = [x] + [d.values for _, d in delta.diffs() if d.values.numel()]
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, trained, grad), torch.autograd.grad(expected, trained, grad)):
        torch.testing.assert_close(got, want)


def _fold_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for each call that tries to fold a selective delta into its host, whether it did."""
    calls, host_call = [], SparseDelta.host_call

    def spy(self, host: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        out = host_call(self, host, x)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(SparseDelta, "host_call", spy)
    return calls


def test_folding_keeps_every_other_delta_and_the_order_of_those_that_read_the_base_output(monkeypatch) -> None:
    """LoRA adds to the output, so a selective delta after it folds; an (IA)³ scale before it reads the output
    without the change, so the change is then added after the host, as in any unfolded pass."""
    host = nn.Linear(32, 24)
    model = nn.Sequential(host)
    for config, name in ((PaFi(targets=["0"], fraction=0.05), "sparse"), (LoRA(r=2, targets=["0"]), "lora"),
                         (IA3(targets=["0"]), "scale")):
        peftkit.attach(model, config, name)
    randomize(model)
    slot, x = host.peftkit, torch.randn(8, 16, 32)
    base = F.linear(x, host.weight, host.bias)
    change, increment, scale = F.linear(x, slot["sparse"].weight.dense()), slot["lora"].increment(x), slot["scale"].ia3_l.flatten()
    calls = _fold_calls(monkeypatch)
    expected = {("lora", "sparse"): (base + change + increment, [True]),
                ("sparse", "scale"): ((base + change) * scale, [True]),
                ("scale", "sparse"): (base * scale + change, []),
                ("sparse",): (base + change, [True])}
    for order, (want, folded) in expected.items():
        peftkit.activate(model, list(order))
        calls.clear()
        torch.testing.assert_close(model(x), want)
        assert calls == folded, order


def test_small_batches_routed_rows_and_autocast_do_not_fold(monkeypatch, tiny, ids) -> None:
    peftkit.attach(tiny, PaFi(targets=["q", "ffn.0"], fraction=0.1))
    randomize(tiny)
    calls = _fold_calls(monkeypatch)
    tiny(ids)
    assert calls == [True, True]
    calls.clear()
    tiny(ids[:1, :2])  # 2 rows: a weight-sized copy would cost more than the activations
    with peftkit.routed(tiny, ["default"] * 6):
        tiny(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiny(ids)
    assert not any(calls)


def test_a_deep_copy_folds_its_own_weights_and_remove_restores_the_plain_forward() -> None:
    model = nn.Sequential(nn.Linear(32, 24))
    peftkit.attach(model, PaFi(targets=["0"], fraction=0.05))
    randomize(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.add_(1.0)
        twin[0].peftkit["default"].weight.values.mul_(2.0)
    x = torch.randn(8, 16, 32)
    for m in (model, twin):
        torch.testing.assert_close(m(x), F.linear(x, m[0].weight + m[0].peftkit["default"].weight.dense(), m[0].bias))
    peftkit.remove(model, "default")
    assert "forward" not in model[0].__dict__ and "forward" in twin[0].__dict__
    torch.testing.assert_close(model(x), F.linear(x, model[0].weight, model[0].bias))


def test_sparse_products_and_slices_route_rows_like_rows_alone(tiny, ids) -> None:
    peftkit.attach(tiny, PaFi(targets=ALL, fraction=0.05), "elements")
    peftkit.attach(tiny, FishMask(targets=["q", "ffn.0", "ffn.2"]), "slices")
    install_masks(tiny, "slices", {"attn.q.weight": Mask.slices(0, torch.tensor([2, 7])),
                                   "ffn.0.weight": Mask.slices(0, torch.tensor([0, 9, 30])),
                                   "ffn.2.weight": Mask.slices(1, torch.tensor([3, 4]))})
    randomize(tiny)
    linear_diffs = [m.peftkit["elements"].weight for m in tiny.modules() if isinstance(m, nn.Linear) and hasattr(m, "peftkit")]
    assert linear_diffs and all(0 < d.size() <= SPARSE_MAX_DENSITY * d.shape.numel() for d in linear_diffs)
    assert {d.size() <= min(d.shape) for d in linear_diffs} == {True, False}  # both element paths run
    rows = ["elements", "slices", None, "elements", "slices", "elements"]
    assert_routed_matches_rows(tiny, ids, rows)
    grads = assert_routed_grads_match_rows(tiny, ids, rows)
    assert any(".peftkit.slices." in n for n in grads) and any(".peftkit.elements." in n for n in grads)


@pytest.mark.parametrize("mask", [Mask.elements(torch.tensor([3, 3])), Mask.elements(torch.tensor([48])),
                                  Mask.elements(torch.tensor([-1])), Mask.elements(torch.tensor([0.5])),
                                  Mask.slices(2, torch.tensor([0]))])
def test_bad_masks_are_named_errors(tiny, mask: Mask) -> None:
    model = nn.Sequential(nn.Linear(8, 6))
    peftkit.attach(model, FishMask(targets=["0"]))
    with pytest.raises(MaskError, match="weight"):
        install_masks(model, "default", {"0.weight": mask})


def test_masks_for_parameters_the_adapter_does_not_adapt_are_named_errors(tiny) -> None:
    peftkit.attach(tiny, FishMask(targets=["q"]))
    with pytest.raises(MaskError, match="does not adapt.*attn.k.weight"):
        install_masks(tiny, "default", {"attn.k.weight": Mask.elements(torch.tensor([0]))})
    with pytest.raises(MaskError, match="does not adapt.*attn.q.scale"):
        install_masks(tiny, "default", {"attn.q.scale": Mask.whole()})


# --- training moves nothing outside the mask ---------------------------------------------------------------------

def _train(model: nn.Module, ids: torch.Tensor, name: str, steps: int = 5) -> None:
    optimizer = torch.optim.AdamW(peftkit.adapter_parameters(model, name), lr=0.1, weight_decay=0.5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(steps):
        F.cross_entropy(model(ids), labels).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("data_driven", [False, True])
def test_adamw_with_weight_decay_moves_nothing_outside_the_mask(tiny, ids, data_driven: bool) -> None:
    base = _base_state(tiny)
    config = (FishMask if data_driven else PaFi)(targets=ALL, fraction=0.1, modules_to_save=["head"])
    peftkit.attach(tiny, config)
    if data_driven:
        peftkit.select(tiny, "default", [(ids, torch.tensor([2, 1, 0, 2, 1, 0]))])
    _train(tiny, ids, "default")
    assert all(torch.equal(p, base[n]) for n, p in _base_state(tiny).items())  # the base is never written
    masks = {f"{h}.{p}": d for h in peftkit.api.get_registry(tiny).hosts["default"] if h != "head"
             for p, d in tiny.get_submodule(h).peftkit["default"].diffs()}
    peftkit.merge(tiny)
    merged = _base_state(tiny)
    moved = 0
    for key, diff in masks.items():
        inside = torch.zeros(base[key].numel(), dtype=torch.bool)
        inside[diff.flat_change()[0]] = True
        assert torch.equal(merged[key].flatten()[~inside], base[key].flatten()[~inside]), key  # bit-identical
        moved += int((merged[key].flatten()[inside] != base[key].flatten()[inside]).sum())
    assert moved > 0.9 * sum(d.size() for d in masks.values())
    peftkit.unmerge(tiny)
    assert all(torch.equal(p, base[n]) for n, p in _base_state(tiny).items())  # unmerge restores bit for bit


def test_gradients_are_kept_only_for_selected_entries(tiny, ids) -> None:
    """Memory: the trainable tensors (and so their .grad and optimizer state) hold only the selected entries."""
    peftkit.attach(tiny, PaFi(targets=ALL, fraction=0.05))
    F.cross_entropy(tiny(ids), torch.zeros(6, dtype=torch.long)).backward()
    trainable = [p for p in tiny.parameters() if p.requires_grad]
    total = sum(p.numel() for n, p in tiny.named_parameters() if n.endswith("weight") and not n.startswith("head"))
    assert sum(p.numel() for p in trainable) == round(0.05 * total)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in trainable)
    assert all(p.grad is None for n, p in tiny.named_parameters() if ".peftkit." not in n)


# --- merge, files, routing ---------------------------------------------------------------------------------------

def test_merge_equals_unmerged_and_several_adapters_share_a_model(tiny, ids) -> None:
    peftkit.attach(tiny, PaFi(targets=ALL, fraction=0.2), "a")
    peftkit.attach(tiny, BitFit(targets=["q", "k", "ffn.0"]), "b")
    randomize(tiny)
    for name, changed in (("a", "attn.k.weight"), ("b", "attn.q.bias")):
        peftkit.activate(tiny, name)
        assert_merge_roundtrip(tiny, ids, changed)
    peftkit.activate(tiny, ["a", "b"])
    both = tiny(ids)
    peftkit.merge(tiny)
    torch.testing.assert_close(tiny(ids), both)


def test_removing_a_merged_adapter_restores_the_base_bit_for_bit(tiny, ids) -> None:
    base, before = _base_state(tiny), tiny(ids)
    peftkit.attach(tiny, PaFi(targets=ALL, fraction=0.2, modules_to_save=["head"]))
    randomize(tiny)
    peftkit.merge(tiny)
    peftkit.remove(tiny, "default")
    assert all(torch.equal(p, base[n]) for n, p in _base_state(tiny).items())
    assert torch.equal(tiny(ids), before)


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]])
def test_overlapping_merged_adapters_unmerge_in_any_order(tiny, ids, order: list[str]) -> None:
    base = _base_state(tiny)
    peftkit.attach(tiny, PaFi(targets=["q", "ffn.0"], fraction=0.3), "a")
    peftkit.attach(tiny, PaFi(targets=["q"], fraction=0.2), "b")  # the smallest entries of q: shared with "a"
    randomize(tiny)
    peftkit.activate(tiny, ["a", "b"])
    both = tiny(ids)
    peftkit.merge(tiny)
    torch.testing.assert_close(tiny(ids), both)
    peftkit.unmerge(tiny, order[0])
    torch.testing.assert_close(tiny(ids), both)  # one folded in, the other unmerged: the same pair
    peftkit.unmerge(tiny, order[1])
    for name, p in _base_state(tiny).items():
        torch.testing.assert_close(p, base[name], rtol=0, atol=1e-6)


def test_save_load_merge_reproduces_outputs_and_files_are_sparse(tiny, ids, tmp_path: Path) -> None:
    fresh = copy.deepcopy(tiny)
    peftkit.attach(tiny, PaFi(targets=ALL, fraction=0.1, modules_to_save=["head"]), "mine")
    randomize(tiny)
    expected = tiny(ids)
    peftkit.save(tiny, tmp_path, "mine")
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert tensors["attn.q.weight.indices"].dtype == torch.int32
    assert tensors["attn.q.weight.values"].shape == tensors["attn.q.weight.indices"].shape
    assert not any(k.endswith("bias.values") for k in tensors)  # PaFi trains weights only
    peftkit.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids), expected, rtol=0, atol=0)
    peftkit.merge(fresh)
    torch.testing.assert_close(fresh(ids), expected, rtol=1e-6, atol=1e-6)


def test_a_file_with_indices_out_of_range_does_not_load(tiny, tmp_path: Path) -> None:
    fresh = copy.deepcopy(tiny)
    peftkit.attach(tiny, PaFi(targets=["q"], fraction=0.1))
    peftkit.save(tiny, tmp_path)
    file = tmp_path / "adapter.safetensors"
    tensors = load_file(str(file))
    tensors["attn.q.weight.indices"][-1] = 10_000
    save_file(tensors, str(file))
    with pytest.raises(MaskError, match=r"mask indices must lie in \[0, 256\)"):
        peftkit.load(fresh, tmp_path)
    assert peftkit.adapters(fresh) == {}


def test_mixed_batch_with_lora_and_base_equals_rows_alone(tiny, ids) -> None:
    peftkit.attach(tiny, PaFi(targets=ALL, fraction=0.2), "sparse")
    peftkit.attach(tiny, BitFit(targets=["q", "ffn.0", "ffn.2"]), "bias")
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "k", "ffn.2"]), "lora")
    randomize(tiny)
    rows = ["sparse", "lora", None, "bias", "sparse", "lora"]
    assert_routed_matches_rows(tiny, ids, rows)
    grads = assert_routed_grads_match_rows(tiny, ids, rows)
    assert all(any(f".peftkit.{name}." in n for n in grads) for name in ("sparse", "bias", "lora"))
