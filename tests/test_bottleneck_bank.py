"""The bottleneck bank: many bottleneck adapters on one host applied to a routed batch without gradients by two batched
matmuls per group of one placement and one non-linearity, kept across passes, never stale; padding of the widths exact
even where f(0) ≠ 0; with gradients the group loop runs as before."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit import Bottleneck, LoRA
from peftkit.core.slot import BATCHED_MIN_GROUPS, SLOT_ATTR
from peftkit.methods.additive.bottleneck import ACTIVATIONS, BottleneckBank, BottleneckBanks, BottleneckDelta

from .checks import assert_routed_grads_match_rows, row_alone
from .conftest import randomize

HOSTS = ["attn.q", "attn.v", "ffn.0", "ffn.2"]  # ffn.2 reads 32 features: a parallel adapter there reads 32, a serial 16
# name: (bottleneck size, placement, scale, activation)
ADAPTERS = {"s0": (2, "serial", 1.0, "relu"), "s1": (5, "serial", 0.7, "relu"), "p0": (3, "parallel", 4.0, "relu"),
            "p1": (6, "parallel", 1.3, "relu"), "g0": (4, "serial", 2.0, "gelu"), "t0": (3, "parallel", 0.5, "tanh")}
ROWS = ["p1", "s0", None, "lora", "g0", "s1", "p0", "t0", "s0", "p1"]


def _banks(model: nn.Module, host: str) -> BottleneckBanks:
    return getattr(model.get_submodule(host), SLOT_ATTR)._banks[BottleneckDelta]


def _group(model: nn.Module, host: str, placement: str, activation: str = "relu") -> BottleneckBank:
    return _banks(model, host).groups[(placement == "parallel", ACTIVATIONS[activation])]


def _attach(model: nn.Module) -> None:
    for name, (size, placement, scale, activation) in ADAPTERS.items():
        peftkit.attach(model, Bottleneck(bottleneck=size, placement=placement, scale=scale, activation=activation,
                                         targets=HOSTS), name)
    peftkit.attach(model, LoRA(r=2, targets=HOSTS), "lora")
    randomize(model)


def _assert_rows(model: nn.Module, ids: torch.Tensor, rows: list[str | None], tol: float = 1e-6) -> None:
    """The routed batch (no gradients) equals each row run alone with its adapter, and the adapters differ."""
    with torch.no_grad():
        with peftkit.routed(model, rows):
            mixed = model(ids)
        alone = [row_alone(model, ids, row, name) for row, name in enumerate(rows)]
        outs = [row_alone(model, ids, 0, name) for name in dict.fromkeys(rows)]
    for row, expected in enumerate(alone):
        torch.testing.assert_close(mixed[row], expected, rtol=tol, atol=tol)
    assert all(not torch.allclose(a, b, atol=1e-3) for i, a in enumerate(outs) for b in outs[i + 1:])


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 50, (len(ROWS), 5))


def test_mixed_sizes_placements_scales_and_activations_equal_rows_alone(tiny, ids) -> None:
    _attach(tiny)
    assert len(ADAPTERS) >= BATCHED_MIN_GROUPS
    _assert_rows(tiny, ids, ROWS)
    serial, parallel = _group(tiny, "ffn.2", "serial"), _group(tiny, "ffn.2", "parallel")
    assert set(serial._entries) == {"s0", "s1"} and set(parallel._entries) == {"p0", "p1"}
    assert set(_group(tiny, "ffn.2", "serial", "gelu")._entries) == {"g0"}
    assert set(_group(tiny, "ffn.2", "parallel", "tanh")._entries) == {"t0"}
    down, down_bias, up, up_bias = parallel.stacks
    assert down.shape[1:] == (6, 32) and up.shape[1:] == (6, 16)  # widths padded to the largest; reads ffn.2's input
    assert serial.stacks[0].shape[1:] == (5, 16)  # a serial adapter reads ffn.2's output
    assert not any(stack[0].any() for stack in parallel.stacks)  # the zero entry
    p0 = parallel._entries["p0"].position
    assert not down[p0, 3:].any() and not down_bias[p0, 3:].any() and not up[p0, 3:].any()
    delta = tiny.ffn[2].peftkit.p0
    torch.testing.assert_close(up_bias[p0], delta.up.bias * 4.0)  # s folded into the up-projection
    stacks, rows = serial.stacks, serial._rows[2]
    _assert_rows(tiny, ids, ROWS)
    assert serial.stacks is stacks and serial._rows[2] is rows  # the same rows again: nothing stacked or gathered again
    _assert_rows(tiny, ids, [*ROWS[:-2], None, "p1"])  # one s0 row fewer
    assert serial.stacks is stacks and serial._rows[2] is not rows  # other rows: gathered again from the same stacks
    _assert_rows(tiny, ids, list(reversed(ROWS)))


def test_padded_units_add_nothing_where_f_of_zero_is_not_zero(tiny, ids) -> None:
    """An f with f(0) = 0.5 (sigmoid) on adapters of different widths: padded units must meet zero up-rows."""
    _attach(tiny)
    for host in HOSTS:
        for name in ("s0", "s1"):  # widths 2 and 5 in one group
            tiny.get_submodule(host).peftkit[name].act = torch.sigmoid
    _assert_rows(tiny, ids, ROWS)
    bank = _banks(tiny, "attn.q").groups[(False, torch.sigmoid)]
    assert set(bank._entries) == {"s0", "s1"} and bank.stacks[0].shape[1] == 5


def test_changed_weights_and_scales_are_never_stale(tiny, ids) -> None:
    _attach(tiny)
    _assert_rows(tiny, ids, ROWS)
    with torch.no_grad():
        tiny.attn.q.peftkit.s1.up.weight.mul_(-2.0)  # in place: the version counter moves
        tiny.attn.v.peftkit.p0.down.bias.add_(0.5)
        tiny.ffn[2].peftkit.p1.down.weight.data = torch.randn(6, 32)  # new storage, the same Parameter
    tiny.ffn[0].peftkit.s0.scale = 3.0
    _assert_rows(tiny, ids, ROWS)


def test_a_removed_adapters_position_is_reused(tiny, ids) -> None:
    _attach(tiny)
    _assert_rows(tiny, ids, ROWS)
    place = _group(tiny, "ffn.2", "parallel")._entries["p0"].position
    peftkit.remove(tiny, "p0")
    assert "p0" not in _group(tiny, "ffn.2", "parallel")._entries
    peftkit.attach(tiny, Bottleneck(bottleneck=9, placement="parallel", scale=2.5, targets=HOSTS), "p0")  # wider
    randomize(tiny, "p0")
    _assert_rows(tiny, ids, ROWS)
    bank = _group(tiny, "ffn.2", "parallel")
    assert bank._entries["p0"].position == place and bank.stacks[0].shape[1] == 9


def test_half_precision_host(tiny, ids) -> None:
    tiny.to(torch.bfloat16)
    _attach(tiny)  # adapter weights stay float32 beside the bf16 weights
    _assert_rows(tiny, ids, ROWS, tol=2e-2)
    assert _group(tiny, "ffn.2", "serial").stacks[0].dtype == torch.float32


def test_gradients_take_the_group_loop(tiny, ids) -> None:
    """Training is unchanged: with gradients nothing is banked, and every adapter's gradient equals its rows'."""
    _attach(tiny)
    grads = assert_routed_grads_match_rows(tiny, ids, ROWS)
    assert _banks(tiny, "ffn.2").groups == {}
    assert all(grads[f"ffn.2.peftkit.{name}.up.weight"].abs().sum() > 0 for name in ADAPTERS)



class BlockNet(nn.Module):
    """Token embeddings, then a residual MLP block (fc1, GELU, fc2) with its own forward, as a ViT's `mlp`."""

    def __init__(self, vocab: int = 50, d: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.mlp.forward = lambda h: self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(h)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return h + self.mlp(h)


def test_adapters_beside_a_whole_block_run_from_the_bank(ids) -> None:
    """AdaptFormer's placement: parallel adapters on a block of linear layers read the block's input and add to its
    output; in the bank as on Linear hosts."""
    model = BlockNet().eval()
    names = [f"b{i}" for i in range(BATCHED_MIN_GROUPS + 1)]
    for i, name in enumerate(names):
        peftkit.attach(model, Bottleneck(bottleneck=3 + i, placement="parallel", scale=0.1 * (i + 1),
                                         activation="relu", targets=["mlp"]), name)
    randomize(model)
    rows = [None if row is None else names[index % len(names)] for index, row in enumerate(ROWS)]
    _assert_rows(model, ids, rows)
    assert set(_group(model, "mlp", "parallel")._entries) == set(names)


def test_adapters_beside_an_nn_sequential_block(tiny, ids) -> None:
    """The slot is the Sequential's last child and passes its output through; the hooks add the adapters."""
    names = [f"b{i}" for i in range(BATCHED_MIN_GROUPS + 1)]
    for i, name in enumerate(names):
        peftkit.attach(tiny, Bottleneck(bottleneck=3 + i, placement="parallel", scale=0.1 * (i + 1), targets=["ffn"]),
                       name)
    randomize(tiny)
    rows = [None if row is None else names[index % len(names)] for index, row in enumerate(ROWS)]
    _assert_rows(tiny, ids, rows)
    x = tiny.embed(ids)
    delta = tiny.ffn.peftkit["b1"]  # ffn: Linear, GELU, Linear, then the slot
    peftkit.activate(tiny, "b1")
    with torch.no_grad():
        torch.testing.assert_close(tiny.ffn(x), tiny.ffn[2](tiny.ffn[1](tiny.ffn[0](x))) + delta.increment(x))
