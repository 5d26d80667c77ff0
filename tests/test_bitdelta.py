"""BitDelta: packed signs, α₀ = mean |ΔW| and the forward by formula, exact parts, distillation, merge, routing,
files and their size (the accuracy on BBC News: benchmarks/bench_bitdelta.py, docs/bitdelta.md)."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.core.delta import ModuleCopy
from peftkit.core.registry import adapter_deltas
from peftkit.core.slot import is_delta_parameter
from peftkit.methods.reparameterized.bitdelta import BitDelta, BitDeltaDelta, compress, distill_scales, pack_signs, unpack_signs
from peftkit.methods.selective.sparse import SparseDelta
from peftkit.train.full import save_full

from .checks import assert_merge_roundtrip, assert_routed_matches_rows, model_output
from .conftest import TinyNet

LINEARS = ["attn.q", "attn.k", "attn.v", "ffn.0", "ffn.2"]


@torch.no_grad()
def finetuned(model: nn.Module, seed: int = 1, size: float = 0.1) -> nn.Module:
    """A stand-in full fine-tune of TinyNet: every Linear weight moved as fine-tunes move them (rank 2 plus noise),
    every bias moved, embedding rows 3 and 7 moved, a new head."""
    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for name in LINEARS:
        host = tuned.get_submodule(name)
        (out_features, in_features), rank = host.weight.shape, 2
        low_rank = torch.randn(out_features, rank, generator=generator) @ torch.randn(rank, in_features, generator=generator)
        host.weight += size * (low_rank / rank + 0.2 * torch.randn(host.weight.shape, generator=generator))
        if host.bias is not None:
            host.bias += size * torch.randn(host.bias.shape, generator=generator)
    tuned.embed.weight[[3, 7]] += torch.randn(2, tuned.embed.embedding_dim, generator=generator)
    for param in tuned.head.parameters():
        param.copy_(torch.randn(param.shape, generator=generator))
    return tuned


def compressed(model: nn.Module, seed: int = 1, name: str = "default") -> tuple[nn.Module, nn.Module]:
    """(base with the BitDelta of a fine-tune attached as `name`, the fine-tune)."""
    tuned = finetuned(model, seed)
    return compress(model, tuned, name=name, heads=["head"]), tuned


def bitdeltas(model: nn.Module, name: str = "default") -> list[BitDeltaDelta]:
    return [d for _, _, d in adapter_deltas(model, name) if isinstance(d, BitDeltaDelta)]


def test_packed_signs_round_trip() -> None:
    delta = torch.randn(7, 21)
    delta[0, :3] = 0  # unchanged entries count as +1
    packed = pack_signs(delta)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 3)  # ⌈21/8⌉ bytes a row
    assert torch.equal(unpack_signs(packed, 21), torch.where(delta >= 0, 1.0, -1.0))
    assert torch.equal(unpack_signs(packed, 21, torch.bfloat16), torch.where(delta >= 0, 1.0, -1.0).bfloat16())
    assert int(pack_signs(torch.tensor([[1.0, -1, -1, -1, -1, -1, -1, 1]]))) == 0b10000001  # first entry: bit 7


def test_scale_starts_at_mean_abs_delta_and_forward_is_the_formula(tiny, ids) -> None:
    """α₀ = mean |ΔW|, S = sign(ΔW); h = W_base x + b_ft + α S x on each Linear; embedding rows and the head exact."""
    base = copy.deepcopy(tiny)
    model, tuned = compressed(tiny)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name in LINEARS:
            host, change = reference.get_submodule(name), tuned.get_submodule(name).weight - base.get_submodule(name).weight
            delta = model.get_submodule(name).peftkit["default"]
            assert isinstance(delta, BitDeltaDelta)
            torch.testing.assert_close(delta.scale, change.abs().mean(), rtol=0, atol=0)
            assert torch.equal(delta.signs(torch.float32), torch.where(change >= 0, 1.0, -1.0))
            host.weight += delta.scale * torch.where(change >= 0, 1.0, -1.0)
            if host.bias is not None:
                host.bias.copy_(tuned.get_submodule(name).bias)
        reference.embed.weight.copy_(tuned.embed.weight)
        reference.head.load_state_dict(tuned.head.state_dict())
    torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-6)
    x = torch.randn(4, 16)
    q, change = model.attn["q"], tuned.attn["q"].weight - base.attn["q"].weight
    expected = x @ base.attn["q"].weight.T + tuned.attn["q"].bias + change.abs().mean() * (x @ change.sign().T)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-6)


def test_what_is_exact_and_what_is_signs(tiny) -> None:
    model, tuned = compressed(tiny)
    config = peftkit.adapters(model)["default"]
    assert isinstance(config, BitDelta) and config.targets == LINEARS and config.exact == ["embed"]
    assert config.modules_to_save == ["head"]
    embed = model.embed.peftkit["default"]
    assert isinstance(embed, SparseDelta) and embed.weight.indices.tolist() == [3, 7]  # only the rows that moved
    assert isinstance(model.head.peftkit["default"], ModuleCopy)
    assert model.attn["v"].peftkit["default"].bias_change is None  # v has no bias
    torch.testing.assert_close(model.attn["q"].peftkit["default"].bias_change.bias.values,
                               tuned.attn["q"].bias - model.attn["q"].bias, rtol=0, atol=0)


def test_a_fresh_bitdelta_is_a_noop_and_unchanged_layers_get_no_signs(tiny, ids) -> None:
    before = tiny(ids)
    peftkit.attach(tiny, BitDelta(targets=["q", "ffn.0"]), name="fresh")
    assert torch.equal(tiny(ids), before)
    tuned = copy.deepcopy(tiny)
    with torch.no_grad():
        tuned.ffn[0].weight += 0.1
    peftkit.remove(tiny, "fresh")
    compress(tiny, tuned)
    assert peftkit.adapters(tiny)["default"].targets == ["ffn.0"]


def test_changes_it_cannot_carry_are_refused(tiny) -> None:
    tuned = finetuned(tiny)
    with pytest.raises(ValueError, match="not the base's architecture"):
        compress(tiny, TinyNet(d=8))
    tuned.extra = nn.Parameter(torch.ones(2))  # a parameter the base lacks
    with pytest.raises(ValueError, match=r"extra \['extra'\]"):
        compress(tiny, tuned)
    gru_base = nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 4))
    gru_tuned = copy.deepcopy(gru_base)
    with torch.no_grad():
        for param in gru_tuned.parameters():
            param += 0.1
    with pytest.raises(ValueError, match=r"cannot carry exactly: \['1.weight_ih_l0 \(GRU\)"):
        compress(gru_base, gru_tuned)
    assert not peftkit.adapters(gru_base)  # refused before anything was attached


def test_distillation_lowers_the_output_mismatch(tiny) -> None:
    """Only the α's move, and the logits come closer to the fine-tune's on the batches and on held-out inputs."""
    model, tuned = compressed(tiny, seed=2)
    train, held_out = torch.randint(0, 50, (4, 16, 5)), torch.randint(0, 50, (64, 5))

    def mismatch() -> float:
        return float((model_output(model, held_out) - model_output(tuned, held_out)).square().mean())

    with torch.inference_mode():  # unpacks the signs as inference tensors, which training must not reuse
        before = mismatch()
    others = {n: p.clone() for n, p in model.named_parameters() if not n.endswith(".scale")}
    scales = torch.stack([d.scale.detach().clone() for d in bitdeltas(model)])
    losses = distill_scales(model, "default", tuned, list(train), steps=40, lr=1e-3)
    assert not torch.equal(torch.stack([d.scale.detach() for d in bitdeltas(model)]), scales)
    assert all(torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others)
    assert all(p.requires_grad == is_delta_parameter(n) for n, p in model.named_parameters())  # as before
    print(f"distillation: held-out logit MSE {before:.4f} -> {mismatch():.4f}; loss over the 4 batches "
          f"{sum(losses[:4]):.4f} -> {sum(losses[-4:]):.4f}")
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4]) and mismatch() < 0.85 * before
    peftkit.merge(model)
    with pytest.raises(ValueError, match="must be active and unmerged"):
        distill_scales(model, "default", tuned, list(train))


def test_merge_adds_alpha_signs_and_unmerge_restores(tiny, ids) -> None:
    model, _ = compressed(tiny)
    delta, weight = model.attn["q"].peftkit["default"], model.attn["q"].weight.detach().clone()
    unmerged = model(ids)
    peftkit.merge(model)
    assert torch.equal(model.attn["q"].weight, weight + delta.scale * delta.signs(torch.float32))
    torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)
    peftkit.unmerge(model)
    assert_merge_roundtrip(model, ids, "attn.q.weight")


def test_routed_rows_equal_each_bitdelta_alone(tiny, ids) -> None:
    compress(tiny, finetuned(tiny, seed=1), name="first", heads=["head"])
    compress(tiny, finetuned(tiny, seed=2), name="second", heads=["head"])
    assert_routed_matches_rows(tiny, ids, ["first", None, "second", "first", "second", None])


def test_save_load_round_trip_is_exact_and_keeps_one_bit_per_sign(tiny, ids, tmp_path) -> None:
    base = copy.deepcopy(tiny)
    model, _ = compressed(tiny)
    expected = model(ids)
    path = peftkit.save(model, tmp_path / "bitdelta")
    tensors = load_file(str(path / "adapter.safetensors"))
    assert tensors["attn.q.sign_bits"].dtype == torch.uint8 and tensors["attn.q.sign_bits"].shape == (16, 2)
    peftkit.load(base, path)
    assert torch.equal(base(ids), expected)
    for name in LINEARS:
        saved, loaded = model.get_submodule(name).peftkit["default"], base.get_submodule(name).peftkit["default"]
        assert torch.equal(saved.sign_bits, loaded.sign_bits) and torch.equal(saved.scale, loaded.scale)


def test_adapter_file_is_over_ten_times_smaller_than_the_finetune(tmp_path) -> None:
    """MiniLM with every parameter of the encoder moved (as a full fine-tune moves them), 400 embedding rows and a head."""
    from peftkit.models import load_minilm

    base = load_minilm(num_labels=5)[0]
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "word_embeddings" in name:
                param[:400] += 1e-3
            else:
                param += 1e-3 * torch.randn_like(param)
    compress(base, tuned, heads=["classifier"])
    adapter = peftkit.save(base, tmp_path / "adapter") / "adapter.safetensors"
    full = save_full(tuned, tmp_path / "full") / "model.safetensors"
    ratio = full.stat().st_size / adapter.stat().st_size
    print(f"fine-tune {full.stat().st_size / 1e6:.1f} MB, BitDelta {adapter.stat().st_size / 1e6:.2f} MB: {ratio:.1f}x")
    assert ratio >= 10
