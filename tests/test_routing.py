"""Per-row routing: a mixed batch equals each row run alone, in inference and in training."""
from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import LoRA

from .conftest import randomize
from .checks import assert_routed_grads_match_rows, assert_routed_matches_rows, row_alone

ROWS = ["a", "b", None, "c", "a", "d"]


def _four_adapters(tiny) -> None:
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "v"]), "a")
    peftkit.attach(tiny, LoRA(r=4, alpha=2, targets="all-linear", modules_to_save=[], rank_pattern={"head": 2}), "b")
    peftkit.attach(tiny, LoRA(r=3, targets=["embed", "ffn.0"], rslora=True), "c")
    peftkit.attach(tiny, LoRA(r=1, targets=["k", "ffn.2"], modules_to_save=["head"]), "d")
    randomize(tiny)


@pytest.mark.parametrize("rows", [ROWS, ["a", "a", "b", "b", "c", "d"], [None] * 6, ["d"] * 6])
def test_mixed_batch_equals_rows_alone(tiny, ids, rows) -> None:
    _four_adapters(tiny)
    tiny.eval()
    assert_routed_matches_rows(tiny, ids, rows)  # for ROWS its guard covers a, b, None, c and d pairwise


def test_routed_gradients_reach_only_used_adapters(tiny, ids) -> None:
    _four_adapters(tiny)
    rows = ["a", "b", None, "a", "b", None]  # c and d unused
    with peftkit.routed(tiny, rows):
        tiny(ids).square().sum().backward()
    for name, param in tiny.named_parameters():
        used = ".peftkit.a." in name or ".peftkit.b." in name
        if ".peftkit." not in name:
            assert param.grad is None, f"frozen base parameter {name} got a gradient"
        elif used and name.endswith("lora_B"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        elif not used:
            assert param.grad is None or param.grad.abs().sum() == 0, f"{name} got a gradient from rows it never saw"


def test_routed_gradients_equal_per_row_sum(tiny, ids) -> None:
    _four_adapters(tiny)
    assert_routed_grads_match_rows(tiny, ids, ROWS)


@pytest.mark.parametrize("rows", [["a", "a", "b", "b", "c", "c"], [None, "b", "b", "a", "a", None]])
def test_rows_in_runs_take_the_slice_path(tiny, ids, rows) -> None:
    """Each adapter's rows contiguous (anywhere in the batch, any order of runs): slices of the batch itself."""
    _four_adapters(tiny)
    with peftkit.routed(tiny, rows) as plan:
        out = tiny(ids)
        perm, segments = plan.layout(("b", "a"))
    assert perm is None and segments == [("b", rows.index("b"), rows.index("b") + 2), ("a", rows.index("a"), rows.index("a") + 2)]
    for row, name in enumerate(rows):
        torch.testing.assert_close(out[row], row_alone(tiny, ids, row, name), rtol=1e-5, atol=1e-5)


def test_routing_errors(tiny, ids) -> None:
    _four_adapters(tiny)
    with pytest.raises(peftkit.UnknownAdapterError, match="'zzz'.*attached: a, b, c, d"):
        with peftkit.routed(tiny, ["a", "zzz", None, None, None, None]):
            pass
    with pytest.raises(ValueError, match="routing names 4 rows but module .* got 6 rows"):  # 6 is no multiple of 4
        with peftkit.routed(tiny, ["a", "b", "c", "d"]):
            tiny(ids)
    peftkit.activate(tiny, "a")
    peftkit.merge(tiny, "a")
    with pytest.raises(ValueError, match="merged"):
        with peftkit.routed(tiny, ROWS):
            pass
    with pytest.raises(ValueError, match="merged"):
        with peftkit.disabled(tiny):
            pass


def test_routing_is_restored_after_block(tiny, ids) -> None:
    """Inside the block rows follow ROWS (not the active adapter); after it, even when it raised, the active
    adapter is back for every row."""
    _four_adapters(tiny)
    rows_alone = torch.stack([row_alone(tiny, ids, row, name) for row, name in enumerate(ROWS)])
    peftkit.activate(tiny, "b")
    before = tiny(ids)
    assert not torch.allclose(rows_alone, before, atol=1e-4)  # so the check inside can tell routing from "b"
    with pytest.raises(RuntimeError):
        with peftkit.routed(tiny, ROWS):
            torch.testing.assert_close(tiny(ids), rows_alone, rtol=1e-5, atol=1e-5)
            raise RuntimeError("boom")
    assert peftkit.active_adapters(tiny) == ["b"]
    torch.testing.assert_close(tiny(ids), before)


@pytest.mark.parametrize("same_shape", [True, False])
def test_many_adapters_batched_path_equals_rows_alone(tiny, ids, same_shape: bool) -> None:
    """Five adapter groups on one layer take the stacked bmm path (or its fallback when ranks differ)."""
    from peftkit.core.slot import BATCHED_MIN_GROUPS

    names = [f"n{i}" for i in range(5)]
    assert len(names) >= BATCHED_MIN_GROUPS
    for i, name in enumerate(names):
        rank = 2 if same_shape else i + 1
        peftkit.attach(tiny, LoRA(r=rank, alpha=float(i + 1), targets=["q", "v", "ffn.0"]), name)
    randomize(tiny)
    rows = ["n3", "n0", None, "n4", "n1", "n2"]
    assert_routed_matches_rows(tiny, ids, rows)
    grads = assert_routed_grads_match_rows(tiny, ids, rows)
    assert all(any(f".peftkit.{n}.lora_A" in g for g in grads) for n in names)
