"""Merging adapters: each method against its formula written out by hand, cat as the exact sum of the deltas, DARE's
seed and unbiasedness, TIES' sign election, the merged adapter as an ordinary one (routes, merges, saves, loads), the
refusals, and the `peftkit merge` command."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import peftkit
from peftkit.compose import AdapterMerge, AdapterMergeError, merge_adapters
from peftkit.compose import merge_math
from peftkit.core.registry import adapter_deltas
from peftkit.methods.selective.mask import Mask
from peftkit.methods.selective.selection import install_masks
from peftkit.methods.selective.sparse import SparseDelta

from .checks import assert_merge_roundtrip, assert_routed_matches_rows, model_output
from .conftest import TinyNet, randomize

HOSTS = ["attn.q", "ffn.0"]


def _loras(model: nn.Module, ranks: dict[str, int], targets: list[str] = HOSTS) -> None:
    for name, r in ranks.items():
        peftkit.attach(model, peftkit.LoRA(r=r, alpha=2.0 * r + 1, targets=targets), name=name)
    randomize(model)


def _factors(model: nn.Module, name: str, host: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    delta = model.get_submodule(host).peftkit[name]
    return delta.lora_A.detach(), delta.lora_B.detach(), delta.scaling


def _dw(model: nn.Module, name: str, host: str) -> torch.Tensor:
    """ΔW = s·B·A of one adapter on one Linear, by hand (a merged_diff's: its dense weight change)."""
    delta = model.get_submodule(host).peftkit[name]
    if isinstance(delta, SparseDelta):
        return delta.weight.dense().detach()
    a, b, s = _factors(model, name, host)
    return s * b @ a


def _by_hand(method: str, tensors: list[torch.Tensor], weights: list[float], density: float = 1.0,
             sign: str = "total", masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The task-vector formulas entry by entry, with plain Python loops (masks: DARE's kept entries)."""
    flat = [t.flatten().tolist() for t in tensors]
    if method in ("ties", "magnitude_prune"):
        for values in flat:
            nonzero = [abs(v) for v in values if v != 0]
            keep = max(1, round(density * len(nonzero)))
            threshold = sorted(nonzero, reverse=True)[keep - 1]
            values[:] = [v if abs(v) >= threshold else 0.0 for v in values]
    if method.startswith("dare"):
        flat = [[v / density if kept else 0.0 for v, kept in zip(values, m.flatten().tolist())]
                for values, m in zip(flat, masks)]
    out = []
    for j in range(len(flat[0])):
        terms = [w * values[j] for w, values in zip(weights, flat)]
        if method in ("linear", "magnitude_prune", "dare_linear"):
            out.append(sum(terms))
            continue
        mass = sum(terms) if sign == "total" else sum((t > 0) - (t < 0) for t in terms)
        elected = 1 if mass >= 0 else -1
        agree = [t for t in terms if t != 0 and (t > 0) == (elected > 0)]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return torch.tensor(out).view(tensors[0].shape)


# --- LoRA: cat, linear, svd ---------------------------------------------------------------------------------------

def test_cat_is_exactly_the_weighted_sum_of_the_deltas(tiny, ids) -> None:
    _loras(tiny, {"a": 2, "b": 3, "c": 1})
    weights = {"a": 0.7, "b": -1.3, "c": 2.0}
    merge_adapters(tiny, weights, method="cat", new_name="cat")
    for host in HOSTS:
        expected = sum(w * _dw(tiny, n, host) for n, w in weights.items())
        torch.testing.assert_close(_dw(tiny, "cat", host), expected, rtol=1e-5, atol=1e-6)
        assert _factors(tiny, "cat", host)[0].shape[0] == 6  # rank 2 + 3 + 1
    merge_adapters(tiny, {"a": 1, "b": 1}, method="cat", new_name="both")
    peftkit.activate(tiny, ["a", "b"])  # two active adapters add their outputs: the same model
    torch.testing.assert_close(model_output(tiny, ids), (peftkit.activate(tiny, "both"), model_output(tiny, ids))[1])


def test_linear_mixes_the_factors_as_peft_and_is_not_the_sum_of_deltas(tiny) -> None:
    _loras(tiny, {"a": 2, "b": 2})
    weights = {"a": 0.6, "b": -0.9}
    merge_adapters(tiny, weights, method="linear", new_name="lin")
    for host in HOSTS:
        a_sum, b_sum = torch.zeros(2, tiny.get_submodule(host).in_features), 0
        for name, w in weights.items():
            a, b, s = _factors(tiny, name, host)
            c = w * s
            a_sum = a_sum + (1 if c >= 0 else -1) * abs(c) ** 0.5 * a
            b_sum = b_sum + abs(c) ** 0.5 * b
        torch.testing.assert_close(_dw(tiny, "lin", host), b_sum @ a_sum, rtol=1e-5, atol=1e-6)
        exact = sum(w * _dw(tiny, n, host) for n, w in weights.items())
        assert (_dw(tiny, "lin", host) - exact).abs().max() > 0.1  # the cross terms B_i A_j


def test_svd_is_the_best_rank_k_approximation_of_the_sum(tiny) -> None:
    _loras(tiny, {"a": 3, "b": 3})
    weights = {"a": 1.0, "b": 0.5}
    merge_adapters(tiny, weights, method="svd", new_name="low", rank=2)
    merge_adapters(tiny, weights, method="svd", new_name="full")  # default rank: 3 + 3, exact
    for host in HOSTS:
        total = sum(w * _dw(tiny, n, host) for n, w in weights.items())
        u, s, vh = torch.linalg.svd(total)
        torch.testing.assert_close(_dw(tiny, "low", host), u[:, :2] @ torch.diag(s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(_dw(tiny, "full", host), total, rtol=1e-4, atol=1e-5)
        assert _factors(tiny, "low", host)[0].shape[0] == 2


@pytest.mark.parametrize("method,options", [("ties", {"density": 0.4}), ("magnitude_prune", {"density": 0.3}),
                                            ("ties", {"density": 0.5, "sign_method": "frequency"}),
                                            ("linear", {})])
def test_task_vector_methods_on_lora_deltas_match_the_formula(method: str, options: dict) -> None:
    """On the dense ΔW_i of each module; stored dense (exact), and as a LoRA: its truncated SVD."""
    model = TinyNet()
    peftkit.attach(model, peftkit.LoRA(r=2, targets=HOSTS), name="a")
    peftkit.attach(model, peftkit.LoRA(r=3, targets=HOSTS), name="b")
    peftkit.attach(model, peftkit.AdaLoRA(init_r=2, target_r=2, targets=HOSTS, total_step=10), name="c")  # no plain factors
    randomize(model)
    weights = {"a": 1.0, "b": 0.8, "c": -0.5}
    merge_adapters(model, weights, method=method, new_name="dense", store="dense", **options)
    merge_adapters(model, weights, method=method, new_name="low", rank=3, **options)
    for host in HOSTS:
        deltas = [model.get_submodule(host).peftkit[n].delta_weight().detach() for n in weights]
        expected = _by_hand(method, deltas, list(weights.values()), options.get("density", 1.0),
                            options.get("sign_method", "total"))
        torch.testing.assert_close(_dw(model, "dense", host), expected, rtol=1e-5, atol=1e-6)
        u, s, vh = torch.linalg.svd(expected)
        torch.testing.assert_close(_dw(model, "low", host), u[:, :3] @ torch.diag(s[:3]) @ vh[:3], rtol=1e-4, atol=1e-5)


def test_dare_matches_its_formula_with_the_seeded_masks_and_is_reproducible(tiny) -> None:
    _loras(tiny, {"a": 2, "b": 2})
    weights = {"a": 1.0, "b": 0.7}
    for method in ("dare_linear", "dare_ties"):
        merge_adapters(tiny, weights, method=method, new_name=method, store="dense", density=0.3, seed=7)
        merge_adapters(tiny, weights, method=method, new_name=f"{method}-again", store="dense", density=0.3, seed=7)
        merge_adapters(tiny, weights, method=method, new_name=f"{method}-other", store="dense", density=0.3, seed=8)
        generator = torch.Generator().manual_seed(7)  # the masks are drawn host by host, adapter by adapter
        for host in HOSTS:
            deltas = [_dw(tiny, n, host) for n in weights]
            masks = [torch.rand(d.shape, generator=generator) < 0.3 for d in deltas]
            expected = _by_hand(method, deltas, list(weights.values()), 0.3, masks=masks)
            torch.testing.assert_close(_dw(tiny, method, host), expected, rtol=1e-5, atol=1e-6)
            assert torch.equal(_dw(tiny, method, host), _dw(tiny, f"{method}-again", host))
            assert not torch.equal(_dw(tiny, method, host), _dw(tiny, f"{method}-other", host))


def test_dare_drop_is_unbiased_and_keeps_the_density() -> None:
    """Over 400 seeds the mean of drop(t) is t (relative error of the mean ~ √((1−d)/(d·400)) = 0.08 at d = 0.3)."""
    t = torch.randn(50, 40)
    drops = torch.stack([merge_math.drop(t, 0.3, torch.Generator().manual_seed(seed)) for seed in range(400)])
    kept = (drops != 0).float().mean()
    assert abs(kept - 0.3) < 0.01
    assert ((drops.mean(0) - t).norm() / t.norm()) < 0.12
    ratio = drops[0] / t  # each entry dropped or rescaled by 1/d
    assert bool(((ratio == 0) | torch.isclose(ratio, torch.tensor(1 / 0.3))).all())


# --- TIES on a crafted example ------------------------------------------------------------------------------------

def test_ties_trims_elects_the_sign_by_mass_and_averages_the_agreeing_entries() -> None:
    t1 = torch.tensor([3.0, -2.0, 0.5, 1.0])
    t2 = torch.tensor([1.0, 1.0, 0.2, -4.0])
    t3 = torch.tensor([-1.5, 1.5, -0.1, -0.5])
    # trim to 3 of 4: t1 drops 0.5, t2 drops 0.2, t3 drops -0.1
    # entry 0: 3, 1, -1.5 -> mass +2.5, elected +, mean(3, 1) = 2
    # entry 1: -2, 1, 1.5 -> mass +0.5, elected +, mean(1, 1.5) = 1.25 (two small positives outvote one large negative)
    # entry 2: all trimmed -> 0;  entry 3: 1, -4, -0.5 -> mass -3.5, elected -, mean(-4, -0.5) = -2.25
    merged = merge_math.combine("ties", [t1, t2, t3], [1.0, 1.0, 1.0], density=0.75)
    torch.testing.assert_close(merged, torch.tensor([2.0, 1.25, 0.0, -2.25]))
    # by count of signs instead of mass, entry 1 is still + (2 vs 1) but entry 0 too: (+, +, -)
    frequency = merge_math.combine("ties", [t1, t2, t3], [1.0, 1.0, 1.0], density=0.75, sign_method="frequency")
    torch.testing.assert_close(frequency, torch.tensor([2.0, 1.25, 0.0, -2.25]))
    mass_vs_count = [torch.tensor([-5.0]), torch.tensor([1.0]), torch.tensor([1.0])]
    assert merge_math.combine("ties", mass_vs_count, [1, 1, 1], density=1.0).item() == -5.0
    assert merge_math.combine("ties", mass_vs_count, [1, 1, 1], density=1.0, sign_method="frequency").item() == 1.0


# --- (IA)³, selective, module copies ------------------------------------------------------------------------------

def test_ia3_merges_the_changes_of_its_vectors(tiny) -> None:
    config = peftkit.IA3(targets=["attn.k", "ffn.2"], feedforward=["ffn.2"])
    for name in ("a", "b"):
        peftkit.attach(tiny, config, name=name)
        with torch.no_grad():
            for _, _, delta in adapter_deltas(tiny, name):
                delta.ia3_l.copy_(1 + 0.3 * torch.randn_like(delta.ia3_l))
    merge_adapters(tiny, {"a": 0.5, "b": 1.5}, method="linear", new_name="lin")
    merge_adapters(tiny, {"a": 1.0, "b": 1.0}, method="ties", new_name="ties", density=0.5)
    for host in ("attn.k", "ffn.2"):
        slot = tiny.get_submodule(host).peftkit
        la, lb = slot["a"].ia3_l.detach(), slot["b"].ia3_l.detach()
        torch.testing.assert_close(slot["lin"].ia3_l.detach(), 1 + 0.5 * (la - 1) + 1.5 * (lb - 1))
        torch.testing.assert_close(slot["ties"].ia3_l.detach(), 1 + _by_hand("ties", [la - 1, lb - 1], [1, 1], 0.5))
    assert peftkit.adapters(tiny)["lin"].feedforward == ["ffn.2"]


def _selective(model: nn.Module, name: str, seed: int) -> None:
    """A FishMask adapter on random element masks of the FFN weights and biases, with random values."""
    peftkit.attach(model, peftkit.FishMask(targets=["ffn.0", "ffn.2"]), name=name)
    generator = torch.Generator().manual_seed(seed)
    masks = {f"{host}.{param}": Mask.elements(torch.randperm(p.numel(), generator=generator)[:p.numel() // 4])
             for host in ("ffn.0", "ffn.2") for param, p in model.get_submodule(host).named_parameters(recurse=False)}
    install_masks(model, name, masks)
    randomize(model, name)


def test_selective_deltas_merge_on_their_entries(tiny, ids) -> None:
    _selective(tiny, "a", 0)
    _selective(tiny, "b", 1)
    merge_adapters(tiny, {"a": 1.0, "b": 1.0}, method="linear", new_name="sum")
    merge_adapters(tiny, {"a": 1.0, "b": 0.5}, method="ties", new_name="ties", density=0.5, store="dense")
    peftkit.activate(tiny, ["a", "b"])
    both = model_output(tiny, ids)
    peftkit.activate(tiny, "sum")
    torch.testing.assert_close(model_output(tiny, ids), both, rtol=1e-5, atol=1e-6)
    for host in ("ffn.0", "ffn.2"):
        slot = tiny.get_submodule(host).peftkit
        for param in ("weight", "bias"):
            changes = [getattr(slot[n], param).dense().detach() for n in ("a", "b")]
            summed = getattr(slot["sum"], param)
            assert summed.is_elements and summed.size() == int(torch.count_nonzero(changes[0] + changes[1]))
            torch.testing.assert_close(getattr(slot["ties"], param).dense(), _by_hand("ties", changes, [1, 0.5], 0.5))


def test_module_copies_merge_as_task_vectors(tiny) -> None:
    for name in ("a", "b"):
        peftkit.attach(tiny, peftkit.LoRA(r=2, targets=HOSTS, modules_to_save=["head"]), name=name)
    randomize(tiny)
    merge_adapters(tiny, {"a": 0.5, "b": 2.0}, method="cat", new_name="cat")
    merge_adapters(tiny, {"a": 1.0, "b": 1.0}, method="ties", new_name="ties", density=0.5)
    slot = tiny.head.peftkit
    for param in ("weight", "bias"):
        base, a, b = (getattr(m, param).detach() for m in (tiny.head, slot["a"].module, slot["b"].module))
        torch.testing.assert_close(getattr(slot["cat"].module, param), base + 0.5 * (a - base) + 2.0 * (b - base))
        expected = base + _by_hand("ties", [a - base, b - base], [1, 1], 0.5)
        torch.testing.assert_close(getattr(slot["ties"].module, param), expected)


# --- an ordinary adapter ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cat", "svd", "ties-sparse", "selective", "ia3"])
def test_merged_adapter_routes_merges_saves_and_loads(kind: str, tmp_path, ids) -> None:
    model = TinyNet()
    base = copy.deepcopy(model)
    if kind == "selective":
        _selective(model, "a", 0)
        _selective(model, "b", 1)
        merge_adapters(model, {"a": 1.0, "b": -0.5}, method="magnitude_prune", density=0.5, new_name="m")
    elif kind == "ia3":
        for name in ("a", "b"):
            peftkit.attach(model, peftkit.IA3(targets=["attn.k", "ffn.2"], feedforward=["ffn.2"]), name=name)
        randomize(model)
        merge_adapters(model, {"a": 0.5, "b": 0.5}, method="dare_ties", density=0.5, new_name="m")
    else:
        _loras(model, {"a": 2, "b": 3})
        options = {"cat": {"method": "cat"}, "svd": {"method": "svd", "rank": 2},
                   "ties-sparse": {"method": "ties", "density": 0.3, "store": "sparse"}}[kind]
        merge_adapters(model, {"a": 1.0, "b": 0.5}, new_name="m", **options)
    assert_routed_matches_rows(model, ids, ["m", "a", None, "m", "b", None])
    peftkit.activate(model, "m")
    expected = model_output(model, ids)
    peftkit.save(model, tmp_path / "m", name="m")
    assert peftkit.load(base, tmp_path / "m") == "m"
    torch.testing.assert_close(model_output(base, ids), expected, rtol=1e-5, atol=1e-6)
    assert_merge_roundtrip(model, ids, "ffn.2.weight" if kind in ("selective", "ia3") else "ffn.0.weight")


def test_a_reused_merge_rewrites_its_adapter_in_place(tiny) -> None:
    """LoRAHub's loop: one merge, attached once, refilled per candidate weight vector; each fill equals a fresh merge."""
    _loras(tiny, {"a": 2, "b": 2, "c": 2})
    merge = AdapterMerge(tiny, ["a", "b", "c"], method="linear")
    merge.attach("hub", [1.0, 0.0, 0.0])
    factor = tiny.attn.q.peftkit["hub"].lora_A
    for weights in ([0.2, 0.5, -0.3], [1.0, 1.0, 1.0]):
        merge.write("hub", weights)
        merge_adapters(tiny, dict(zip("abc", weights)), method="linear", new_name="fresh")
        for host in HOSTS:
            torch.testing.assert_close(_dw(tiny, "hub", host), _dw(tiny, "fresh", host))
        peftkit.remove(tiny, "fresh")
    assert tiny.attn.q.peftkit["hub"].lora_A is factor
    peftkit.attach(tiny, peftkit.LoRA(r=2, targets=HOSTS), name="other")
    with pytest.raises(AdapterMergeError, match="'other' was not made by this merge"):
        merge.write("other", [1.0, 1.0, 1.0])


# --- merging two task adapters keeps both tasks ------------------------------------------------------------------

def _task_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def test_two_task_adapters_merged_keep_both_tasks() -> None:
    """Two LoRAs on the first layer, each trained on its own task: inputs in its own half of the input space (its A
    reads only that half), a random change of the outputs to learn. Merged by cat (task arithmetic, weights 1), each
    task's loss equals its own adapter's (the deltas act on disjoint inputs); TIES at density 0.7 (trimming 30% of
    each ΔW) keeps most of what each adapter learned. The BBC version: benchmarks/bench_merge.py."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    tasks = {}
    for name, half in (("left", slice(0, 8)), ("right", slice(8, 16))):
        x = torch.zeros(256, 16)
        x[:, half] = torch.randn(256, 8)
        y = model(x).detach() + x[:, half] @ torch.randn(8, 4) * 0.5
        tasks[name] = (x, y)
        peftkit.attach(model, peftkit.LoRA(r=4, alpha=4, targets=["0"], init="gaussian"), name=name)
        lora_a = model[0].peftkit[name].lora_A
        with torch.no_grad():
            lora_a.mul_(torch.zeros(16).index_fill_(0, torch.arange(16)[half], 1))  # no gradient ever reaches the rest
        optimizer = torch.optim.Adam(list(peftkit.adapter_parameters(model, name)), lr=1e-2)
        for _ in range(200):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        peftkit.set_trainable(model, name, False)
    own = {}
    for name, (x, y) in tasks.items():
        peftkit.activate(model, name)
        own[name] = _task_loss(model, x, y)
    with peftkit.disabled(model):
        bare = {name: _task_loss(model, x, y) for name, (x, y) in tasks.items()}
    for method, options, kept in (("cat", {}, 1.0), ("ties", {"density": 0.7}, 0.8)):
        merge_adapters(model, {"left": 1.0, "right": 1.0}, method=method, new_name=method, **options)
        for name, (x, y) in tasks.items():
            merged = _task_loss(model, x, y)
            print(f"{method}: {name} loss {own[name]:.4f} alone, {merged:.4f} merged, {bare[name]:.4f} bare")
            assert own[name] < 0.5 * bare[name]  # each adapter learned its task
            assert bare[name] - merged >= kept * (bare[name] - own[name]) - 1e-5


# --- refusals -----------------------------------------------------------------------------------------------------

def test_refusals_name_the_adapters_and_the_reason(tiny) -> None:
    _loras(tiny, {"a": 2, "b": 3})
    peftkit.attach(tiny, peftkit.LoRA(r=2, targets=["attn.q"]), name="q_only")
    peftkit.attach(tiny, peftkit.Bottleneck(bottleneck=4, targets=["ffn.2"]), name="bottle")
    peftkit.attach(tiny, peftkit.IA3(targets=["attn.k"]), name="ia3")
    peftkit.attach(tiny, peftkit.LoRA(r=2, targets=HOSTS, bias="lora_only"), name="biased")
    peftkit.attach(tiny, peftkit.Compose(peftkit.LoRA(r=2, targets=["attn.q"]), gates="learned"), name="gated")
    peftkit.attach(tiny, peftkit.Compose(peftkit.LoRA(r=2, targets=["attn.q"]),
                                         peftkit.Bottleneck(bottleneck=4, targets=["ffn.2"])), name="mixed")
    cases = [
        ({"gated": 1}, {}, r"'gated' \(compose\) cannot be merged: its ComposedDelta on 'attn.q' has no fixed weight "
                           r"change: part 0 \(lora\) is scaled by a learned gate"),
        ({"a": 1, "mixed": 1}, {"method": "svd"}, r"'mixed' \(compose\) cannot be merged: .* on 'ffn.2' .*part 1 "
                                                  r"\(bottleneck\): BottleneckDelta has no weight delta"),
        ({"a": 1, "bottle": 1}, {}, r"'bottle' \(bottleneck\) cannot be merged: its BottleneckDelta on 'ffn.2'"),
        ({"a": 1, "ia3": 1}, {}, r"'a' \(lora\) and 'ia3' \(ia3\) have no common merged form"),
        ({"a": 1, "q_only": 1}, {}, r"linear mixes the LoRA factors of 'a' and 'q_only', which differ at \['ffn.0'\]"),
        ({"a": 1, "b": 1}, {}, r"differ at \['attn.q', 'ffn.0'\] \(modules or ranks\): use cat"),
        ({"a": 1, "biased": 1}, {}, r"'biased' \(lora\) cannot be merged: it trains biases"),
        ({"a": float("nan"), "b": 1}, {"method": "cat"}, r"finite numbers; got a: nan"),
        ({"a": 1, "b": 1}, {"method": "ties"}, r"ties needs a density"),
        ({"a": 1, "b": 1}, {"method": "ties", "density": 0.5, "seed": 1}, r"ties takes no seed"),
        ({"a": 1, "b": 1}, {"method": "cat", "rank": 4}, r"cat keeps the LoRA factors"),
        ({"ia3": 1}, {"method": "cat"}, r"cat stacks plain LoRA factors; 'ia3' \(ia3\) have none: use linear"),
        ({"ia3": 1}, {"method": "svd"}, r"svd re-factors .* ia3 adapters have none"),
        ({"a": 1}, {"method": "linear", "store": "lora"}, r"linear keeps the LoRA factors"),
        ({"a": 1, "b": 1}, {"method": "svd", "rank": 17}, r"rank 17 exceeds min\(out, in\) = 16 of 'attn.q'"),
        ({"a": 1}, {"method": "magnitude_prune", "density": 0.5, "store": "sparse", "rank": 2}, r"store='sparse' has none"),
    ]
    for weights, options, message in cases:
        with pytest.raises(AdapterMergeError, match=message):
            merge_adapters(tiny, weights, new_name="m", **options)
    with pytest.raises(peftkit.UnknownAdapterError, match="no adapter named 'nope'"):
        merge_adapters(tiny, {"a": 1, "nope": 1}, method="cat")
    with pytest.raises(ValueError, match="'a' is already attached"):
        merge_adapters(tiny, {"a": 1, "b": 1}, method="cat", new_name="a")
    assert "m" not in peftkit.adapters(tiny) and "merged" not in peftkit.adapters(tiny)


def test_cat_over_the_modules_rank_is_refused_and_svd_offered() -> None:
    model = TinyNet()
    _loras(model, {"a": 10, "b": 10}, targets=["attn.q"])
    with pytest.raises(AdapterMergeError, match="cat gives rank 20 on 'attn.q', above its min\\(out, in\\) = 16: use svd"):
        merge_adapters(model, {"a": 1, "b": 1}, method="cat")


def test_merge_math_pieces() -> None:
    t = torch.tensor([[0.0, -3.0], [1.0, 2.0]])
    assert torch.equal(merge_math.trim(t, 0.34), torch.tensor([[0.0, -3.0], [0.0, 0.0]]))  # 1 of 3 non-zero
    assert torch.equal(merge_math.trim(t, 0.67), torch.tensor([[0.0, -3.0], [0.0, 2.0]]))
    a, b = [torch.randn(2, 5) for _ in range(2)], [torch.randn(4, 2) for _ in range(2)]
    stacked_a, stacked_b = merge_math.concatenated(a, b, [0.5, -2.0])
    torch.testing.assert_close(stacked_b @ stacked_a, 0.5 * b[0] @ a[0] - 2.0 * b[1] @ a[1])
    big_a, big_b = torch.randn(7, 3, 2, 2), torch.randn(5, 7, 1, 1)  # a conv's factors, rank 7 > out = 5
    for rank in (2, 5, 6):
        exact = merge_math.truncated_svd(torch.einsum("or,rikl->oikl", big_b.flatten(1), big_a), rank)
        fast = merge_math.factored_svd(big_a, big_b, rank)
        product = [torch.einsum("or,rikl->oikl", b.flatten(1), a) for a, b in (exact, fast)]
        torch.testing.assert_close(product[1], product[0], rtol=1e-4, atol=1e-4)
        assert fast[0].shape == (rank, 3, 2, 2) and fast[1].shape == (5, rank, 1, 1)
    for w in itertools.product([1.0, -0.25], repeat=2):
        a_w, b_w = merge_math.peft_factor_weights(w)
        assert [x * y for x, y in zip(a_w, b_w)] == pytest.approx(list(w))


# --- peftkit merge --------------------------------------------------------------------------------------------------

def test_cli_merges_saved_adapters_as_the_api_does(tmp_path, capsys) -> None:
    from peftkit.cli import main
    from peftkit.models import load_minilm

    model, tokenizer = load_minilm()
    for name in ("news", "sport"):
        peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, targets=["query", "value"]), name=name)
        randomize(model, name, scale=0.05)
        peftkit.save(model, tmp_path / name, name=name)
    merge_adapters(model, {"news": 0.5, "sport": 1.0}, method="svd", rank=6, new_name="merged")
    inputs = dict(tokenizer(["a short sentence", "another one, longer"], padding=True, return_tensors="pt"))
    expected = model_output(model, inputs).last_hidden_state

    argv = ["merge", "--model", "minilm", "--adapter", f"news={tmp_path / 'news'}:0.5", "--adapter",
            str(tmp_path / "sport"), "--method", "svd", "--rank", "6", "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "news x 0.5, sport x 1 -> svd -> lora adapter 'merged' on 12 modules" in capsys.readouterr().out
    fresh = load_minilm()[0]
    assert peftkit.load(fresh, tmp_path / "out") == "merged"
    torch.testing.assert_close(model_output(fresh, inputs).last_hidden_state, expected, rtol=1e-4, atol=1e-5)

    for bad, message in [(["--method", "ties"], "ties needs a density"),
                         (["--adapter", f"x={tmp_path / 'nope'}:1"], "adapter directory"),
                         (["--adapter", f"news={tmp_path / 'news'}:inf"], "must be a finite number"),
                         (["--adapter", str(tmp_path / "news")], "--adapter entries share the name 'news'")]:
        base = ["merge", "--model", "minilm", "--adapter", f"news={tmp_path / 'news'}", "--output", str(tmp_path / "o2")]
        assert main(base + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("peftkit: error:") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o2").exists()
