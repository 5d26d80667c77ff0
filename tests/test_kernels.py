"""The selective methods' CPU kernel (torch.compile of a transpose): the same bits as torch's eager copy, used only
where it applies; a failed or disabled compile falls back to the eager copy with one warning instead of an error."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn

from peftkit import Mask
from peftkit.methods.selective import kernels
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
    """A folded Linear whose dV is sampled at the mask: compiled transposes change no bit."""
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
