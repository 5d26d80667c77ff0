"""NF-k codebooks and packing, NFLinear, and LoftQ: a start nearer W than zero-init QLoRA's, at 4 and 2 bits."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit import LoRA
from peftkit.core.hosts import QuantizedHost
from peftkit.efficient.loftq import LoftQOptions, loftq, loftq_initialise
from peftkit.efficient.nf_codebook import (NFLinear, dequantize_nf, nf_codebook, pack_codes, quantize_nf,
                                           unpack_codes)
from peftkit.efficient.bnb_linear import bnb
from peftkit.efficient.quantize import quantization_errors, quantize

from .conftest import randomize


def _weight(out: int = 96, inp: int = 128) -> torch.Tensor:
    return torch.randn(out, inp) * 0.05


def test_nf4_codebook_is_bitsandbytes_table_and_every_k_is_a_normal_float() -> None:
    torch.testing.assert_close(nf_codebook(4), bnb.functional.get_4bit_type("nf4", device="cpu"), rtol=0, atol=1e-6)
    for bits in range(2, 9):
        codes = nf_codebook(bits)
        assert codes.numel() == 2 ** bits and (codes.diff() > 0).all()  # 2^k distinct values, ascending
        assert codes[0] == -1 and codes[-1] == 1 and (codes == 0).sum() == 1  # absmax hits a code; 0 is exact
        assert (codes > 0).sum() == 2 ** (bits - 1)  # the extra code is positive, as in NF4
    for bad in (1, 9):
        with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
            nf_codebook(bad)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits: int) -> None:
    codes = torch.randint(0, 2 ** bits, (1001,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_nf_dequantization_is_codebook_lookup_times_block_absmax() -> None:
    weight = _weight(5, 30)  # 150 values: blocks of 64, the last one short
    weight[0, :] = 0.0  # a block with zeros in it; the first 30 of block 0
    state = quantize_nf(weight, 3, 64)
    flat = weight.flatten()
    codebook = nf_codebook(3)
    expected = torch.empty_like(flat)
    for start in range(0, 150, 64):
        block = flat[start:start + 64]
        absmax = block.abs().max()
        nearest = (block[:, None] / absmax - codebook).abs().argmin(1)
        expected[start:start + 64] = codebook[nearest] * absmax
    assert state.scales.shape == (3,) and state.codes.numel() == math.ceil(150 * 3 / 8)
    torch.testing.assert_close(dequantize_nf(state), expected.view(5, 30))
    assert (dequantize_nf(state)[0] == 0).all()


def test_nf4_codes_are_bitsandbytes_nf4_byte_for_byte() -> None:
    weight = _weight()
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf(weight, 4, 64)
    assert torch.equal(ours.codes, packed.flatten()) and torch.equal(ours.scales, state.absmax)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nflinear_stores_codes_and_scales_and_dequantizes_in_forward(bits: int) -> None:
    linear = nn.Linear(128, 96)
    host = NFLinear.from_linear(linear, bits, block_size=32)
    assert isinstance(host, QuantizedHost) and host.weight.dtype == torch.uint8 and not host.weight.requires_grad
    assert host.weight.numel() == 96 * 128 * bits // 8 and host.weight_scales.shape == (96 * 128 // 32,)
    torch.testing.assert_close(host.dequantized_weight(), dequantize_nf(quantize_nf(linear.weight, bits, 32)))
    x = torch.randn(4, 128)
    torch.testing.assert_close(host(x), F.linear(x, host.dequantized_weight(), linear.bias))
    error = (host.dequantized_weight() - linear.weight).norm() / linear.weight.norm()
    assert error < {2: 0.65, 3: 0.25, 4: 0.12, 8: 0.03}[bits]
    with pytest.raises(ValueError, match=r"stores a \(96, 128\) weight"):
        host.store_weight(torch.zeros(128, 96))


@pytest.mark.parametrize("bits", [4, 2])
def test_loftq_starts_nearer_w_than_zero_init_qlora(bits: int) -> None:
    weight = _weight()
    results = {iters: loftq(weight, 8, 2.0, iters, LoftQOptions(bits=bits).quantizer(96, 128, weight.device))
               for iters in (1, 5)}
    first, last = results[1], results[5]
    assert first.qlora_error == pytest.approx(float((weight - _round_trip(weight, bits)).norm()), rel=1e-6)
    # T = 1 is SVD_r of QLoRA's residual: its error is the residual's tail singular values (Eckart-Young)
    tail = torch.linalg.svdvals(weight - _round_trip(weight, bits))[8:]
    assert first.error == pytest.approx(float(tail.norm()), rel=1e-4)
    assert last.error <= first.error < first.qlora_error
    start = last.base + 2.0 * last.b @ last.a  # dequant(Q) + s·BA
    assert float((weight - start).norm()) == pytest.approx(last.error, rel=1e-4)


def _round_trip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    host = LoftQOptions(bits=bits).quantizer(*weight.shape, weight.device)
    host.store_weight(weight)
    return host.dequantized_weight()


@pytest.mark.parametrize("bits", [4, 2])
def test_lora_loftq_init_puts_quantized_base_and_factors_in_place(bits: int, tmp_path) -> None:
    model = nn.Sequential(nn.Linear(128, 96), nn.GELU(), nn.Linear(96, 8))
    original = copy.deepcopy(model)
    x = torch.randn(6, 128)
    config = LoRA(r=8, alpha=16, init="loftq", loftq=LoftQOptions(bits=bits, iters=3), targets=["0"])
    peftkit.attach(model, config)
    delta, host = model[0].peftkit["default"], model[0]
    error, qlora_error = delta.loftq_errors
    assert error < qlora_error
    exact = original[0].weight.detach()
    assert float((exact - _round_trip(exact, bits)).norm()) == pytest.approx(qlora_error, rel=1e-6)
    # the base is what the quantizer stores: quantizing it again gives it back (bitsandbytes' double-quantized
    # absmax moves by a rounding step of its 8-bit code when re-quantized)
    requantized = _round_trip(host.weight.detach(), bits)
    torch.testing.assert_close(requantized, host.weight.detach(), rtol=0, atol=0 if bits == 2 else 1e-3)
    start = (host.weight + delta.scaling * delta.lora_B @ delta.lora_A).detach()
    assert float((exact - start).norm()) == pytest.approx(error, rel=1e-4)
    out = model[0](x)
    torch.testing.assert_close(out, F.linear(x, start, host.bias))
    peftkit.save(model, tmp_path / "loftq")
    saved = peftkit.read_adapter(tmp_path / "loftq")[0]
    assert saved.init == "zero" and saved.loftq is None and saved.r == 8  # a plain LoRA on the LoftQ base
    base = copy.deepcopy(original)
    base[0].weight.data.copy_(host.weight)
    peftkit.load(base, tmp_path / "loftq")
    assert torch.equal(base(x), model(x))
    peftkit.remove(model, "default")
    assert torch.equal(model[0].weight, original[0].weight)  # removing puts the full-precision W back


def test_loftq_refusals() -> None:
    with pytest.raises(ValueError, match="loftq options are for init='loftq'"):
        LoRA(targets=["0"], loftq=LoftQOptions(bits=2))
    with pytest.raises(ValueError, match="loftq init takes no bias training"):
        LoRA(targets=["0"], init="loftq", bias="all")
    with pytest.raises(ValueError, match="bits"):
        LoftQOptions(bits=1)
    model = nn.Sequential(NFLinear.from_linear(nn.Linear(64, 32), 2))
    with pytest.raises(ValueError, match="needs the full-precision weight.*loftq_initialise"):
        peftkit.attach(model, LoRA(r=4, init="loftq", targets=["0"]))
    assert not peftkit.adapters(model)


@pytest.mark.parametrize("bits", [4, 2])
def test_loftq_initialise_on_a_quantized_model(bits: int) -> None:
    model = nn.Sequential(nn.Linear(128, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 8))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    if bits == 4:
        quantize(model, bits=4)  # bitsandbytes NF4 with double quantization
    else:
        for i in (0, 2):
            model[i] = NFLinear.from_linear(model[i], bits)
    peftkit.attach(model, LoRA(r=8, alpha=8, targets=["0", "2"], modules_to_save=["4"]))  # a trained head copy
    qlora_start = {i: model[i].dequantized_weight() for i in (0, 2)}
    head = {n: p.detach().clone() for n, p in model[4].peftkit["default"].named_parameters()}
    results = loftq_initialise(model, "default", weights, iters=3)
    assert results.keys() == {"0", "2"}  # the head copy is no LoRA: left as it was
    assert all(torch.equal(p, head[n]) for n, p in model[4].peftkit["default"].named_parameters())
    for i in (0, 2):
        result, host, delta = results[str(i)], model[i], model[i].peftkit["default"]
        exact = weights[f"{i}.weight"]
        assert result.qlora_error == pytest.approx(float((exact - qlora_start[i]).norm()), rel=1e-5)
        assert result.error < result.qlora_error
        assert torch.equal(host.dequantized_weight(), result.base)  # the host stores LoftQ's Q
        torch.testing.assert_close(delta.delta_weight(), result.b @ result.a, rtol=1e-5, atol=1e-6)
    assert quantization_errors(model) == {}  # Q_T is the base as quantized, not a merge's re-rounding
    model(torch.randn(3, 128)).square().sum().backward()  # trains on top as any LoRA
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        f"{i}.peftkit.default.lora_{f}" for i in (0, 2) for f in "AB"} | {
        f"4.peftkit.default.module.{p}" for p in ("weight", "bias")}


def test_loftq_initialise_refuses_what_it_cannot_do() -> None:
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 4))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model[0] = NFLinear.from_linear(model[0], 2)
    peftkit.attach(model, LoRA(r=2, targets=["0", "1"]))
    with pytest.raises(ValueError, match=r"modules \['1'\] are not quantized"):
        loftq_initialise(model, "default", weights)
    peftkit.remove(model, "default")
    peftkit.attach(model, LoRA(r=2, targets=["0"]))
    with pytest.raises(ValueError, match="have no original weight"):
        loftq_initialise(model, "default", {})
    randomize(model)
    peftkit.merge(model)
    with pytest.raises(ValueError, match="is merged"):
        loftq_initialise(model, "default", weights)
