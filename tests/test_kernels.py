"""The selective methods' CPU kernels (torch.compile of torch operators): the compiled transpose gives the same bits as
torch's eager copy, the compiled column dots give aᵀb at the listed entries to float rounding; each is used only
where it applies, and a failed or disabled compile falls back to torch's eager operators with one warning instead
of an error."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn

from peftkit import Mask
from peftkit.methods.selective import folding, kernels
from peftkit.methods.selective.sparse import SparseDelta

BIG = (1024, 384)  # above COMPILED_MIN_ELEMENTS


class _Counting:
    """A fresh compiled kernel that counts its compiled calls (`calls`)."""

    def __init__(self, kernel: kernels._Compiled):
        self.kernel, self.calls = kernels._Compiled(kernel.fn, kernel.what), 0

    def usable(self, *tensors: torch.Tensor) -> bool:
        return self.kernel.usable(*tensors)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.kernel(*args)


def _fresh(monkeypatch: pytest.MonkeyPatch, attribute: str) -> _Counting:
    """A fresh, counting compiled kernel in place of the module's `attribute`."""
    fresh = _Counting(getattr(kernels, attribute))
    monkeypatch.setattr(kernels, attribute, fresh)
    monkeypatch.delenv(kernels.COMPILE_ENV, raising=False)
    return fresh


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> _Counting:
    """A fresh compiled transpose in place of the module's."""
    return _fresh(monkeypatch, "_compiled_transpose")


@pytest.mark.parametrize("shape, dtype, compiles", [
    (BIG, torch.float32, True), ((1999, 160), torch.float32, True), ((700, 400), torch.float64, True),
    (BIG, torch.bfloat16, True), ((5, 3), torch.float32, False), ((3, 100_000), torch.float32, True)])
def test_transposed_is_the_eager_copy_bit_for_bit(compiled, shape, dtype, compiles: bool) -> None:
    x = torch.randn(shape).to(dtype)
    x.view(-1)[::97] = float("nan")  # any bits at all
    got = kernels.transposed(x)
    assert got.is_contiguous() and got.shape == (shape[1], shape[0])
    assert torch.equal(got.view(torch.uint8), x.t().contiguous().view(torch.uint8))  # NaN payloads included
    assert compiled.calls == int(compiles)


def test_strided_inputs_graphs_and_disabled_compiles_take_the_eager_copy(compiled, monkeypatch) -> None:
    x = torch.randn(2 * BIG[0], BIG[1])
    assert torch.equal(kernels.transposed(x[::2]), x[::2].t().contiguous())
    leaf = torch.randn(BIG, requires_grad=True)
    kernels.transposed(leaf).sum().backward()  # eager: the copy is part of the graph
    assert torch.equal(leaf.grad, torch.ones(BIG))
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")
    kernels.transposed(torch.randn(BIG))
    assert compiled.calls == 0


def test_only_the_compiling_thread_uses_the_compiled_kernel(compiled) -> None:
    x = torch.randn(BIG)
    kernels.transposed(x)
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append((compiled.usable(x), kernels.transposed(x))))
    thread.start()
    thread.join()
    assert compiled.calls == 1 and not elsewhere[0][0]
    assert torch.equal(elsewhere[0][1], x.t().contiguous())


def test_a_failing_compile_warns_once_and_falls_back(compiled, monkeypatch) -> None:
    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nlong compiler output")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: no_compiler)
    x = torch.randn(BIG)
    with pytest.warns(RuntimeWarning, match="InvalidCxxCompiler: no working C\\+\\+ compiler found\\); using torch"):
        assert torch.equal(kernels.transposed(x), x.t().contiguous())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(kernels.transposed(x), x.t().contiguous())
    assert compiled.calls == 1


def test_sampled_gradients_are_the_same_bits_compiled_or_not(compiled, monkeypatch) -> None:
    """A folded Linear whose dV is sampled at the mask (no column dots): compiled transposes change no bit."""
    monkeypatch.setattr(folding, "column_dots", lambda *args: None)
    host = nn.Linear(384, 384).requires_grad_(False)
    delta = SparseDelta(host, ("weight",), {"weight": Mask.elements(torch.randperm(384 * 384)[:2000])})
    x, grad = torch.randn(1024, 384, requires_grad=True), torch.randn(1024, 384)

    def run() -> list[torch.Tensor]:
        out = delta.host_call(host, x)
        return [out, *torch.autograd.grad(out, (x, delta.weight.values), grad)]

    with_compiled = run()
    assert compiled.calls == 2  # gᵀ and xᵀ
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")
    for got, want in zip(with_compiled, run()):
        assert torch.equal(got, want)



# --- column dots ----------------------------------------------------------------------------------------------


@pytest.fixture
def dots(monkeypatch: pytest.MonkeyPatch) -> _Counting:
    """A fresh compiled column-dots kernel in place of the module's."""
    return _fresh(monkeypatch, "_compiled_dots")


def _reference(a: torch.Tensor, b: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    return (a.double().t() @ b.double())[ia, ib]


@pytest.mark.parametrize("rows, p, q, count", [
    (2048, 384, 1536, 3000), (1999, 96, 40, 500), (70, 5, 300, 64), (1, 3, 4, 12), (130, 7, 9, 0)])
def test_column_dots_are_a_transposed_times_b_at_the_entries(dots, rows: int, p: int, q: int, count: int) -> None:
    """Many and few rows, repeated pairs, no pairs at all."""
    a, b = torch.randn(rows, p), torch.randn(rows, q)
    ia, ib = torch.randint(0, p, (count,)), torch.randint(0, q, (count,))
    got = kernels.column_dots(a, b, ia, ib)
    assert got.dtype == torch.float32 and got.shape == (count,)
    torch.testing.assert_close(got.double(), _reference(a, b, ia, ib), rtol=1e-5, atol=1e-5 * rows ** 0.5)
    assert torch.equal(kernels.column_dots(a, b, ia, ib), got)  # the same bits on every run
    assert dots.calls == 2


def test_column_dots_apply_only_to_contiguous_cpu_float_tensors_outside_a_graph(dots, monkeypatch) -> None:
    a, index = torch.randn(64, 8), torch.arange(8)
    assert kernels.column_dots(a, a, index, index) is not None
    for x in (a.double(), a.t(), a[:, ::2], a.clone().requires_grad_(), a.long()):
        assert kernels.column_dots(x, a, index[:4], index[:4]) is None
    with torch.no_grad():
        assert kernels.column_dots(a.clone().requires_grad_(), a, index, index) is not None  # backward runs without a graph
    assert kernels.column_dots(a, a[:10], index, index) is None  # rows differ
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")
    assert kernels.column_dots(a, a, index, index) is None
    assert dots.calls == 2


@pytest.mark.parametrize("ia, ib, error, match", [
    ([0, 8], [0, 1], IndexError, r"ia must lie in \[0, 8\), got \[0, 8\]"),
    ([0, 1], [-1, 1], IndexError, r"ib must lie in \[0, 5\), got \[-1, 1\]"),
    ([0, 1], [0], ValueError, "1-D of one length")])
def test_column_dots_refuse_entries_outside_the_operands(dots, ia, ib, error, match: str) -> None:
    with pytest.raises(error, match=match):
        kernels.column_dots(torch.randn(16, 8), torch.randn(16, 5), torch.tensor(ia), torch.tensor(ib))
    assert dots.calls == 0


def test_a_failing_compile_warns_once_and_the_folded_gradient_takes_torchs_kernels(dots, monkeypatch) -> None:
    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: no_compiler)
    host = nn.Linear(64, 48).requires_grad_(False)
    delta = SparseDelta(host, ("weight",), {"weight": Mask.elements(torch.randperm(64 * 48)[:100])})
    delta.weight.values.data.normal_()
    x, grad = torch.randn(256, 64), torch.randn(256, 48)
    with pytest.warns(RuntimeWarning, match="compiled column dots is unavailable .*InvalidCxxCompiler"):
        (got,) = torch.autograd.grad(delta.host_call(host, x), delta.weight.values, grad)
    rows, columns = delta.weight.indices // 64, delta.weight.indices % 64
    torch.testing.assert_close(got, _reference(grad, x, rows, columns).float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.column_dots(x, x, torch.arange(3), torch.arange(3)) is None
        (again,) = torch.autograd.grad(delta.host_call(host, x), delta.weight.values, grad)
    torch.testing.assert_close(again, got)
