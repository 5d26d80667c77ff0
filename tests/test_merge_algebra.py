"""Merge algebra: any mix of adapters on shared modules either merges to the unmerged forward or is refused unchanged.

The property test draws 2-4 adapters of random methods on the same modules of a tiny BERT and a random sequence
of merge / unmerge / activate / routed steps. After every step the outputs must equal a copy of the model that
holds the same adapters unmerged with the same active set; a refused step must leave every weight bit for bit as
it was; and a full unmerge at the end must give the base weights back to float rounding (1e-6 at order 1).
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import BertConfig, BertModel

import peftkit
from peftkit import IA3, OFT, SSF, BitFit, Bottleneck, DoRA, KronA, LoHa, LoKr, LoRA, MergeError, VeRA

ATTENTION = ["query", "value"]
# Each builder gives a config on shared modules; several draws of one method become different adapters.
METHODS: dict[str, Callable[[], peftkit.AdapterConfig]] = {
    "lora": lambda: LoRA(r=4, alpha=8, targets=ATTENTION),
    "dora": lambda: DoRA(r=4, alpha=8, targets=ATTENTION),
    "ia3": lambda: IA3(targets=ATTENTION),
    "ia3-ff": lambda: IA3(targets=ATTENTION, feedforward=ATTENTION),
    "ssf": lambda: SSF(targets=ATTENTION),
    "vera": lambda: VeRA(r=8, targets=ATTENTION),
    "krona": lambda: KronA(a_shape=(4, 4), targets=ATTENTION),
    "loha": lambda: LoHa(r=2, targets=ATTENTION),
    "lokr": lambda: LoKr(r=2, targets=ATTENTION),
    "oft": lambda: OFT(oft_block_size=4, use_cayley_neumann=False, targets=ATTENTION),
    "bitfit": lambda: BitFit(targets=ATTENTION),
    "bottleneck-parallel": lambda: Bottleneck(bottleneck=8, placement="parallel", targets=["value"]),
    "bottleneck-serial": lambda: Bottleneck(bottleneck=8, targets=["value"]),
}


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    return BertModel(config).eval()


def perturb(model: nn.Module, name: str, seed: int) -> None:
    """Move every parameter of one adapter away from its no-op start (scales stay near 1, so folds stay invertible)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f".peftkit.{name}." in f".{pname}":
                noise = torch.randn(p.shape, generator=generator) * 0.2
                # DoRA's magnitude moves relative to the row norms it starts at, as training moves it
                p.mul_(1 + noise) if pname.endswith("magnitude") else p.add_(noise)


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".peftkit." not in f".{k}"}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def with_adapters(methods: list[str]) -> nn.Module:
    model = tiny_bert()
    for i, method in enumerate(methods):
        peftkit.attach(model, METHODS[method](), name=f"a{i}")
        perturb(model, f"a{i}", seed=i)
    return model


step = st.one_of(
    st.tuples(st.just("merge"), st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True)),
    st.tuples(st.just("unmerge"), st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True)),
    st.tuples(st.just("unmerge-all"), st.just([])),
    st.tuples(st.just("activate"), st.permutations(range(4))),
    st.tuples(st.just("routed"), st.just([])),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(methods=st.lists(st.sampled_from(sorted(METHODS)), min_size=2, max_size=4),
       steps=st.lists(step, min_size=1, max_size=8), active_count=st.integers(1, 4))
def test_any_merge_sequence_keeps_the_unmerged_outputs_or_refuses_unchanged(methods, steps, active_count) -> None:
    model = with_adapters(methods)
    names = [f"a{i}" for i in range(len(methods))]
    reference = copy.deepcopy(model)  # stays unmerged: its outputs are the truth for each active set
    pristine = base_weights(model)
    ids = torch.randint(0, 60, (4, 6), generator=torch.Generator().manual_seed(1))
    peftkit.activate(model, names[:active_count])
    peak = 1.0  # the largest weight any fold produced
    for kind, picks in steps:
        # merge mostly active adapters and unmerge merged ones, so most steps are allowed and do something
        pool = {"merge": peftkit.active_adapters(model), "unmerge": sorted(model._peftkit_registry.merged)}.get(kind)
        chosen = list(dict.fromkeys((pool or names)[i % len(pool or names)] for i in picks))
        before = base_weights(model)
        state = (peftkit.active_adapters(model), sorted(model._peftkit_registry.merged))
        try:
            if kind == "merge":
                peftkit.merge(model, chosen)
            elif kind == "unmerge":
                peftkit.unmerge(model, chosen)
            elif kind == "unmerge-all":
                peftkit.unmerge(model)
            elif kind == "activate":
                peftkit.activate(model, chosen[:max(1, len(chosen) - 1)])
            else:
                rows = [names[i % len(names)] for i in range(3)] + [None]
                with peftkit.routed(model, rows):
                    routed = output(model, ids)
                for row, name in enumerate(rows):
                    if name is None:
                        with peftkit.disabled(reference):
                            alone = output(reference, ids[row:row + 1])
                    else:
                        peftkit.activate(reference, name)
                        alone = output(reference, ids[row:row + 1])
                    torch.testing.assert_close(routed[row:row + 1], alone, rtol=1e-5, atol=1e-5)
        except ValueError as err:  # MergeError, or a plain refusal (already merged, routed while merged)
            assert same_bits(base_weights(model), before), f"{kind} {chosen} raised {err!r} after changing weights"
            assert (peftkit.active_adapters(model), sorted(model._peftkit_registry.merged)) == state
        peftkit.activate(reference, peftkit.active_adapters(model))
        torch.testing.assert_close(output(model, ids), output(reference, ids), rtol=1e-5, atol=1e-5)
        peak = max(peak, max(w.abs().max().item() for w in base_weights(model).values()))
    peftkit.unmerge(model)
    restored = base_weights(model)
    # A fold rounds at the size of the folded weight, so the base comes back to within a few of its ulps (1e-6 for
    # weights of order 1); a wrong unfold leaves an error the size of an adapter's delta
    atol = max(1e-6, 16 * torch.finfo(torch.float32).eps * peak)
    for key, weight in pristine.items():
        torch.testing.assert_close(restored[key], weight, rtol=0, atol=atol)


# --- the cases users reported, each a regression test ---------------------------------------------------------

@pytest.fixture
def lora_ia3() -> nn.Module:
    return with_adapters(["lora", "ia3"])


def test_non_commuting_pair_merged_together_unmerges_to_the_base(lora_ia3) -> None:
    pristine = base_weights(lora_ia3)
    peftkit.activate(lora_ia3, ["a1", "a0"])  # (IA)³ scales the base output, then LoRA adds: they can fold
    peftkit.merge(lora_ia3, ["a0", "a1"])
    peftkit.unmerge(lora_ia3, ["a0", "a1"])
    for key, weight in base_weights(lora_ia3).items():
        torch.testing.assert_close(weight, pristine[key], rtol=0, atol=1e-6)


def test_non_commuting_pair_merged_one_by_one_unmerges_in_any_order(lora_ia3) -> None:
    ids = torch.randint(0, 60, (3, 5))
    pristine = base_weights(lora_ia3)
    peftkit.activate(lora_ia3, ["a1", "a0"])
    unmerged = output(lora_ia3, ids)
    peftkit.merge(lora_ia3, "a1")
    peftkit.merge(lora_ia3, "a0")
    torch.testing.assert_close(output(lora_ia3, ids), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(MergeError, match="'a0'.*under 'a1'|'a1'"):
        peftkit.unmerge(lora_ia3, "a1")  # LoRA would stay folded under (IA)³'s scale, which the reference skips
    peftkit.unmerge(lora_ia3, "a0")
    peftkit.unmerge(lora_ia3, "a1")
    for key, weight in base_weights(lora_ia3).items():
        torch.testing.assert_close(weight, pristine[key], rtol=0, atol=1e-6)


def test_merging_lora_under_an_unmerged_output_scale_is_refused_unchanged(lora_ia3) -> None:
    ids = torch.randint(0, 60, (3, 5))
    peftkit.activate(lora_ia3, ["a1", "a0"])  # h = l ⊙ (W0 x + b) + s·BA x: folded alone, LoRA would be scaled by l
    before = base_weights(lora_ia3)
    with pytest.raises(MergeError, match="'a0'.*under 'a1'.*does not commute"):
        peftkit.merge(lora_ia3, "a0")
    assert same_bits(base_weights(lora_ia3), before) and not lora_ia3._peftkit_registry.merged
    peftkit.activate(lora_ia3, ["a0", "a1"])  # h = l ⊙ (W0 x + b + s·BA x): LoRA folds under the scale
    unmerged = output(lora_ia3, ids)
    peftkit.merge(lora_ia3, "a0")
    torch.testing.assert_close(output(lora_ia3, ids), unmerged, rtol=1e-5, atol=1e-5)


def test_lora_then_dora_merge_is_refused_dora_then_lora_merges_exactly() -> None:
    model = with_adapters(["lora", "dora"])
    ids = torch.randint(0, 60, (3, 5))
    peftkit.activate(model, ["a0", "a1"])  # DoRA's norm is on W0, but merged it would see W0 + LoRA's ΔW
    before = base_weights(model)
    with pytest.raises(MergeError, match="'a1' \\(DoRADelta\\).*pristine base weight"):
        peftkit.merge(model)
    assert same_bits(base_weights(model), before)
    peftkit.activate(model, ["a1", "a0"])
    unmerged = output(model, ids)
    peftkit.merge(model)
    torch.testing.assert_close(output(model, ids), unmerged, rtol=1e-5, atol=1e-5)


def test_dora_unmerged_beside_a_merged_lora_is_refused() -> None:
    model = with_adapters(["lora", "dora"])
    peftkit.activate(model, ["a0", "a1"])  # LoRA would fold inside, but DoRA's norm must still see W0 alone
    with pytest.raises(MergeError, match="'a1' \\(DoRADelta\\) reads the base weight"):
        peftkit.merge(model, "a0")


def test_merged_adapters_stay_active() -> None:
    model = with_adapters(["lora", "ia3"])
    peftkit.activate(model, "a0")
    peftkit.merge(model)
    with pytest.raises(MergeError, match=r"\['a0'\] are merged"):
        peftkit.activate(model, "a1")
    peftkit.attach(model, LoRA(r=2, targets=["key"]), name="new")  # attaching keeps the merged one active
    assert peftkit.active_adapters(model) == ["a0", "new"]
    with pytest.raises(MergeError, match="not active"):
        peftkit.merge(model, "a1")


def test_unmerge_after_training_while_merged_restores_the_base() -> None:
    model = with_adapters(["lora"])
    pristine = base_weights(model)
    peftkit.merge(model)
    perturb(model, "a0", seed=7)  # the adapter changes while merged: unmerge takes out what merge put in
    peftkit.unmerge(model)
    for key, weight in base_weights(model).items():
        torch.testing.assert_close(weight, pristine[key], rtol=0, atol=1e-6)


def test_removing_a_merged_adapter_under_another_keeps_the_other_merged_exactly() -> None:
    model = with_adapters(["ia3", "lora"])
    ids = torch.randint(0, 60, (3, 5))
    peftkit.activate(model, ["a0", "a1"])
    peftkit.merge(model)
    peftkit.remove(model, "a0")  # (IA)³ sat under LoRA: LoRA is folded back onto the bare base
    merged = output(model, ids)
    peftkit.unmerge(model)
    torch.testing.assert_close(merged, output(model, ids), rtol=1e-5, atol=1e-5)
    with peftkit.disabled(model):
        bare = output(model, ids)
    torch.testing.assert_close(bare, output(tiny_bert(), ids), rtol=0, atol=1e-6)


def test_minilm_lora_and_dora_merged_equals_unmerged_or_is_refused() -> None:
    """The reported case, on the real model: LoRA + DoRA active on the same modules differed by up to 0.96."""
    from peftkit.models import load_minilm

    model, tokenizer = load_minilm()
    batch = tokenizer(["Shares rose after the results.", "The striker scored twice."], return_tensors="pt", padding=True)
    for name, config in (("lora", LoRA(r=8, alpha=16, targets=ATTENTION)), ("dora", DoRA(r=8, alpha=16, targets=ATTENTION))):
        peftkit.attach(model, config, name=name)
        perturb(model, name, seed=len(name))
    for active in (["lora", "dora"], ["dora", "lora"]):
        peftkit.activate(model, active)
        with torch.no_grad():
            unmerged = model(**batch).last_hidden_state
        try:
            peftkit.merge(model)
        except MergeError:
            assert active == ["lora", "dora"]
            continue
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).last_hidden_state, unmerged, rtol=1e-4, atol=1e-4)
        peftkit.unmerge(model)


def test_docs_pair_table_matches_a_sample_of_cells() -> None:
    """docs/merging.md's table is scripts/merge_table.py's output: re-derive every fifth cell."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("merge_table", root / "scripts" / "merge_table.py")
    merge_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_table)
    rows = [line for line in (root / "docs" / "merging.md").read_text().splitlines() if line.startswith("| **")]
    names = list(merge_table.METHODS)
    cells = [(a, b, row.split(" | ")[1 + j].strip(" |")) for a, row in zip(names, rows) for j, b in enumerate(names)]
    assert len(rows) == len(names)
    for first, second, documented in cells[::5]:
        assert merge_table.cell(first, second) == documented, f"{first} then {second}"


def test_loading_beside_a_merged_adapter_keeps_it_active_or_is_refused(tmp_path) -> None:
    model = with_adapters(["lora"])
    donor = with_adapters(["lora", "dora"])
    peftkit.save(donor, tmp_path / "lora", name="a0")
    peftkit.save(donor, tmp_path / "dora", name="a1")
    peftkit.merge(model)
    before = base_weights(model)
    peftkit.load(model, tmp_path / "lora", name="more")
    assert peftkit.active_adapters(model) == ["a0", "more"]
    with pytest.raises(MergeError, match="'dora' \\(DoRADelta\\) reads the base weight"):
        peftkit.load(model, tmp_path / "dora", name="dora")  # its norm would see W0 + the merged LoRA
    assert "dora" not in peftkit.adapters(model) and same_bits(base_weights(model), before)


# --- code that reads weights across modules or at attach time (found in review) -----------------------------------

def test_pissa_attached_or_removed_beside_a_merged_scale_keeps_the_base() -> None:
    model = with_adapters(["ia3"])
    pristine = base_weights(model)
    peftkit.merge(model)
    peftkit.attach(model, LoRA(r=2, init="pissa", targets=ATTENTION), name="pissa", activate=False)  # SVD of W0
    perturb(model, "pissa", seed=3)
    peftkit.activate(model, ["a0", "pissa"])
    ids = torch.randint(0, 60, (3, 5))
    merged = output(model, ids)
    peftkit.unmerge(model)
    torch.testing.assert_close(output(model, ids), merged, rtol=1e-5, atol=1e-5)
    peftkit.merge(model, "a0")
    peftkit.remove(model, "pissa")  # W0 restored under the merged (IA)³, not on top of it
    peftkit.unmerge(model)
    peftkit.remove(model, "a0")
    for key, weight in base_weights(model).items():
        torch.testing.assert_close(weight, pristine[key], rtol=0, atol=1e-6)


def test_fresh_dora_attached_beside_a_merged_lora_starts_as_a_no_op() -> None:
    model = with_adapters(["lora"])
    ids = torch.randint(0, 60, (3, 5))
    with peftkit.disabled(model):
        bare = output(model, ids)
    peftkit.merge(model)
    peftkit.attach(model, DoRA(r=2, targets=ATTENTION), name="dora", activate=False)  # its m is ‖W0‖, not ‖W0 + ΔW‖
    peftkit.unmerge(model)
    peftkit.activate(model, "dora")
    torch.testing.assert_close(output(model, ids), bare, rtol=0, atol=1e-6)


def test_merged_head_copy_over_a_merged_child_delta_is_refused() -> None:
    model = with_adapters([])
    peftkit.attach(model, LoRA(r=2, targets=["pooler.dense"]), name="child")
    peftkit.attach(model, LoRA(r=2, targets=["query"], modules_to_save=["pooler"]), name="head", activate=False)
    perturb(model, "child", 0), perturb(model, "head", 1)
    peftkit.activate(model, ["child", "head"])
    peftkit.merge(model, "child")
    before = base_weights(model)
    with pytest.raises(MergeError, match="'head' \\(ModuleCopy\\) on 'pooler' swaps the weights .*pooler.dense"):
        peftkit.merge(model, "head")  # the swap would carry the child's fold into the copy
    assert same_bits(base_weights(model), before)


def test_saving_a_merged_adapter_writes_what_an_unmerged_save_writes(tmp_path) -> None:
    model = with_adapters([])
    peftkit.attach(model, LoRA(r=2, targets=ATTENTION, modules_to_save=["pooler"]), name="a")
    perturb(model, "a", 0)
    peftkit.save(model, tmp_path / "unmerged", name="a")
    peftkit.merge(model)
    peftkit.save(model, tmp_path / "merged", name="a")  # merged, the head copy holds the base's tensors
    from safetensors.torch import load_file
    unmerged, merged = (load_file(tmp_path / d / "adapter.safetensors") for d in ("unmerged", "merged"))
    assert unmerged.keys() == merged.keys()
    for key in unmerged:
        torch.testing.assert_close(merged[key], unmerged[key], rtol=0, atol=1e-6)
