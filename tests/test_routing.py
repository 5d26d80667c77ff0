"""Per-row routing: a mixed batch equals each row run alone, in inference and in training."""
from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import LoRA

from .conftest import randomize

ROWS = ["a", "b", None, "c", "a", "d"]


def _four_adapters(tiny) -> None:
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "v"]), "a")
    peftkit.attach(tiny, LoRA(r=4, alpha=2, targets="all-linear", modules_to_save=[]), "b")
    peftkit.attach(tiny, LoRA(r=3, targets=["embed", "ffn.0"], rslora=True), "c")
    peftkit.attach(tiny, LoRA(r=1, targets=["k", "ffn.2"], modules_to_save=["head"]), "d")
    randomize(tiny)


def _row_alone(tiny, ids: torch.Tensor, row: int, name: str | None) -> torch.Tensor:
    if name is None:
        with peftkit.disabled(tiny):
            return tiny(ids[row:row + 1])[0]
    peftkit.activate(tiny, name)
    return tiny(ids[row:row + 1])[0]


@pytest.mark.parametrize("rows", [ROWS, ["a", "a", "b", "b", "c", "d"], [None] * 6, ["d"] * 6])
def test_mixed_batch_equals_rows_alone(tiny, ids, rows) -> None:
    _four_adapters(tiny)
    tiny.eval()
    with peftkit.routed(tiny, rows):
        mixed = tiny(ids)
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], _row_alone(tiny, ids, row, name), rtol=1e-5, atol=1e-5)


def test_adapters_really_differ(tiny, ids) -> None:
    """Guards the test above: each adapter gives a different output for the same row."""
    _four_adapters(tiny)
    outs = [_row_alone(tiny, ids, 0, name) for name in ["a", "b", None, "c", "d"]]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.allclose(outs[i], outs[j], atol=1e-4)


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
    with peftkit.routed(tiny, ROWS):
        tiny(ids).square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None}
    tiny.zero_grad(set_to_none=True)
    for row, name in enumerate(ROWS):
        if name is not None:  # the bare base row has no trainable path
            _row_alone(tiny, ids, row, name).square().sum().backward()
    for n, p in tiny.named_parameters():
        if n in mixed:
            torch.testing.assert_close(mixed[n], p.grad, rtol=1e-4, atol=1e-5)


def test_presorted_rows_take_the_slice_path(tiny, ids) -> None:
    _four_adapters(tiny)
    rows = ["a", "a", "b", "b", "c", "c"]
    with peftkit.routed(tiny, rows) as plan:
        out = tiny(ids)
        perm, _ = plan.layout(("a", "b", "c"))
        assert perm is None
    for row, name in enumerate(rows):
        torch.testing.assert_close(out[row], _row_alone(tiny, ids, row, name), rtol=1e-5, atol=1e-5)


def test_routing_errors(tiny, ids) -> None:
    _four_adapters(tiny)
    with pytest.raises(peftkit.UnknownAdapterError, match="'zzz'.*attached: a, b, c, d"):
        with peftkit.routed(tiny, ["a", "zzz", None, None, None, None]):
            pass
    with pytest.raises(ValueError, match="routing names 3 rows.*got an input with 6 rows"):
        with peftkit.routed(tiny, ["a", "b", "c"]):
            tiny(ids)
    peftkit.merge(tiny, "a")
    with pytest.raises(ValueError, match="merged"):
        with peftkit.routed(tiny, ROWS):
            pass
    with pytest.raises(ValueError, match="merged"):
        with peftkit.disabled(tiny):
            pass


def test_routing_is_restored_after_block(tiny, ids) -> None:
    _four_adapters(tiny)
    peftkit.activate(tiny, "b")
    before = tiny(ids)
    with pytest.raises(RuntimeError):
        with peftkit.routed(tiny, ROWS):
            raise RuntimeError("boom")
    torch.testing.assert_close(tiny(ids), before)
