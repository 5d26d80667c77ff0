"""Quantized bases (efficient.quantize): NF4 as the codebook times the (double-quantized) block scale, every method on
top equal to the same method on a float base holding the dequantized weights, gradients only to adapters, merge with
its error reported and an exact unmerge, routing, the saved base round trip, the refusals, `peftkit train` with
`model: {quantize: nf4}`, QLoRA learning BBC on MiniLM, and the quantized embedding tables (int8, bf16, nf4) with an
LM head tied to one."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import peftkit
from peftkit import DoRA, IA3, LoRA, BitFit, Bottleneck, LayerNormTuning, PrefixTuning, PromptTuning
from peftkit.core.merging import MergeError
from peftkit.core.targets import TargetError
from peftkit.efficient.quantize import (QuantizationError, QuantizeConfig, load_quantized, quantization_errors,
                                        quantize, quantized_layers, save_quantized)
from peftkit.train import TrainConfigError, config_from_mapping, run_training

from .bbc import LEARNS, _run, bbc_config
from .conftest import randomize
from .train_models import tiny_config

# The NF4 code of QLoRA (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def tiny_llama(seed: int = 0, tied: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    if tied:  # as SmolLM2's
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 64), nn.LayerNorm(64), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def float_twin(quantized: nn.Module, original: nn.Module) -> nn.Module:
    """A float copy of `original` whose quantized layers and tables hold the dequantized weights (a tied head follows
    its table): what a quantized base must compute like."""
    twin = copy.deepcopy(original)
    for name, host in quantized_layers(quantized).items():
        twin.get_submodule(name).weight.data = host.dequantized_weight()
    return twin


def test_nf4_dequantization_is_codebook_times_double_quantized_block_scale() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 96), nn.Linear(96, 2))
    weight = model[0].weight.detach().clone()
    quantize(model, scheme="nf4", double_quant=True, block_size=64)
    host = model[0]
    state = host.weight.quant_state
    packed = host.weight.data.flatten()
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).flatten().long()  # first weight in the high nibble
    # absmax of each block of 64, itself 8-bit: code8[q] · (absmax of its group of 256 blocks) + offset
    groups = torch.arange(state.absmax.numel()) // state.state2.blocksize
    absmax = state.state2.code[state.absmax.long()] * state.state2.absmax[groups] + state.offset
    by_hand = (NF4[codes].view(-1, 64) * absmax.view(-1, 1)).view_as(weight)
    assert state.nested and state.state2.blocksize == 256 and torch.equal(state.code, NF4)
    torch.testing.assert_close(host.dequantized_weight(), by_hand, rtol=0, atol=1e-7)
    # and it is a quantization of the weight: each entry the nearest code of w / absmax
    scaled = (weight.view(-1, 64) / absmax.view(-1, 1)).flatten()
    nearest = (scaled[:, None] - NF4[None, :]).abs().argmin(1)
    assert (nearest == codes).float().mean() > 0.99  # ties and the 8-bit absmax move a few across a boundary
    assert (by_hand - weight).norm() / weight.norm() < 0.12


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8"])
def test_qlora_forward_is_dequantize_then_lora(scheme) -> None:
    model = mlp()
    quantize(model, scheme=scheme)
    peftkit.attach(model, LoRA(r=4, alpha=8, targets=["0", "2"]))
    randomize(model)
    x = torch.randn(5, 128)
    out = model(x)
    expected = x
    for i in (0, 2):
        host, delta = model[i], model[i].peftkit["default"]
        expected = F.linear(expected, host.dequantized_weight(), host.bias) + 2.0 * expected @ delta.lora_A.T @ delta.lora_B.T
        expected = model[i + 1](expected)
    torch.testing.assert_close(out, model[4](expected), rtol=1e-5, atol=1e-5)


METHODS = {
    "lora": lambda: LoRA(r=4, targets="all-linear"),
    "dora": lambda: DoRA(r=4, targets=["q_proj", "v_proj", "down_proj"]),
    "ia3": lambda: IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
    "bottleneck": lambda: Bottleneck(targets=["down_proj"], bottleneck=8),
    "prefix": lambda: PrefixTuning(num_virtual_tokens=3),
    "prompt": lambda: PromptTuning(num_virtual_tokens=3),
    "lora-embedding": lambda: LoRA(r=4, targets=["embed_tokens", "q_proj"]),
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_a_quantized_base_equals_it_on_the_dequantized_float_base(method) -> None:
    """Outputs and adapter gradients equal the float model holding the dequantized weights; only adapters get
    gradients (DoRA's norm is computed on the dequantized weight)."""
    original = tiny_llama()
    quantized = copy.deepcopy(original)
    report = quantize(quantized)
    assert "lm_head" in report.skipped and len(report.quantized) == 14 and report.embeddings == ["model.embed_tokens"]
    twin = float_twin(quantized, original)
    ids = torch.randint(0, 96, (3, 7))
    outputs, grads = [], []
    for model in (quantized, twin):
        torch.manual_seed(1)
        peftkit.attach(model, METHODS[method]())
        randomize(model, scale=0.1)
        out = model(ids).logits
        out.square().mean().backward()
        outputs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(".peftkit." in f".{name}" for name in grads[0])  # only adapter parameters
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6)
    assert not any(p.requires_grad for n, p in quantized.named_parameters() if ".peftkit." not in f".{n}")


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merge_reports_the_requantization_error_and_unmerge_restores_the_stored_weight(method) -> None:
    model = tiny_llama()
    quantize(model)
    peftkit.attach(model, METHODS[method]())
    randomize(model, scale=0.05)
    stored = {name: host.dequantized_weight() for name, host in quantized_layers(model).items()}
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        unmerged = model(ids).logits
        exact = {}
        for name, host in quantized_layers(model).items():  # the merged weight in float, from the delta's formula
            delta = host.peftkit["default"] if hasattr(host, "peftkit") else None
            if delta is not None and method != "ia3":
                exact[name] = stored[name] + delta.delta_weight()
    peftkit.merge(model)
    errors = quantization_errors(model)
    assert errors and all(e.relative_frobenius > 0 for e in errors.values())
    for name, weight in exact.items():  # what is reported is the distance to the exact merged weight
        measured = QuantizationError.between(weight, model.get_submodule(name).dequantized_weight())
        assert errors[name].max_abs == pytest.approx(measured.max_abs, rel=1e-4)  # DoRA's fold rounds differently
        assert errors[name].relative_frobenius == pytest.approx(measured.relative_frobenius, rel=1e-4)
    with torch.no_grad():
        merged = model(ids).logits
    assert 0 < (merged - unmerged).abs().max() < 0.5  # the re-quantization rounds: close, not equal
    peftkit.unmerge(model)
    for name, host in quantized_layers(model).items():
        assert torch.equal(host.dequantized_weight(), stored[name]), f"{name} drifted"
    assert quantization_errors(model) == {}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=0, atol=1e-6)  # (IA)³'s bias: float rounding


def test_mixed_batch_rows_equal_rows_alone_on_a_quantized_base() -> None:
    model = tiny_llama()
    quantize(model)
    peftkit.attach(model, LoRA(r=4, targets=["q_proj", "v_proj"]), "lora")
    peftkit.attach(model, IA3(targets=["k_proj", "down_proj"], feedforward=["down_proj"]), "ia3")
    peftkit.attach(model, DoRA(r=2, targets=["o_proj"]), "dora")
    randomize(model, scale=0.2)
    ids = torch.randint(0, 96, (5, 6))
    rows = ["lora", "ia3", None, "dora", "lora"]
    with torch.no_grad():
        with peftkit.routed(model, rows):
            mixed = model(ids).logits
        alone = []
        for row, name in enumerate(rows):
            if name is None:
                with peftkit.disabled(model):
                    alone.append(model(ids[row:row + 1]).logits[0])
            else:
                peftkit.activate(model, name)
                alone.append(model(ids[row:row + 1]).logits[0])
    torch.testing.assert_close(mixed, torch.stack(alone), rtol=1e-5, atol=1e-5)
    assert len({round(float(a.sum()), 4) for a in alone[:4]}) == 4  # the adapters (and the base) really differ


@pytest.mark.parametrize("scheme, embeddings", [("nf4", "int8"), ("int8", "nf4"), ("nf4", "bf16"), ("nf4", "keep")])
def test_saved_quantized_base_reloads_exactly_without_quantizing(tmp_path, scheme, embeddings, monkeypatch) -> None:
    model = tiny_llama(tied=True)
    quantize(model, scheme=scheme, embeddings=embeddings)
    save_quantized(model, tmp_path / "base")
    from peftkit.efficient import bnb_linear

    def refuse(*args, **kwargs):
        raise AssertionError("loading quantized again")

    monkeypatch.setattr(bnb_linear.bnb.functional, "quantize_4bit", refuse)
    monkeypatch.setattr(bnb_linear.bnb.functional, "int8_vectorwise_quant", refuse)
    fresh = load_quantized(tiny_llama(seed=5, tied=True), tmp_path / "base")
    if embeddings == "keep":
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    else:  # the head reads the loaded table; no float copy of it is left
        assert fresh.lm_head.embedding is fresh.model.embed_tokens
        assert not any(p.shape == (96, 64) for p in fresh.parameters())
    assert quantized_layers(fresh).keys() == quantized_layers(model).keys()
    for name, host in quantized_layers(model).items():
        assert torch.equal(host.dequantized_weight(), fresh.get_submodule(name).dequantized_weight())
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_quantized(nn.Sequential(nn.Linear(4, 4)), tmp_path / "base")


def test_adapter_trained_on_the_quantized_base_loads_onto_the_float_base(tmp_path) -> None:
    """Same tensors; the outputs differ by what quantization changed in the base, no more."""
    original = tiny_llama()
    quantized = copy.deepcopy(original)
    quantize(quantized)
    peftkit.attach(quantized, LoRA(r=4, targets=["q_proj", "v_proj"]))
    randomize(quantized, scale=0.1)
    peftkit.save(quantized, tmp_path / "adapter")
    peftkit.load(original, tmp_path / "adapter")
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        with_adapter = original(ids).logits - quantized(ids).logits
        with peftkit.disabled(original), peftkit.disabled(quantized):
            bases = original(ids).logits - quantized(ids).logits
    assert with_adapter.abs().max() > 0
    assert with_adapter.norm() < 1.5 * bases.norm()


def test_config_errors_name_the_field() -> None:
    for bad, field in (({"scheme": "nf3"}, "scheme"), ({"block_size": 100}, "block_size"),
                       ({"scheme": "nf4", "bits": 8}, "bits"), ({"scheme": "int8", "block_size": 128}, "block_size"),
                       ({"compute_dtype": "float64"}, "compute_dtype"), ({"double_quantization": True}, "double_quant"),
                       ({"embeddings": "fp8"}, "embeddings")):
        with pytest.raises(ValueError, match=field):
            QuantizeConfig(**bad)
    assert QuantizeConfig(bits=8).scheme == "int8" and QuantizeConfig(scheme="fp4").bits == 4


def test_quantize_chooses_layers_and_refuses_what_it_cannot(tmp_path) -> None:
    from peftkit.efficient.nf_codebook import NFLinear

    model = mlp()
    report = quantize(model, skip=["2"])
    assert report.quantized == ["0"] and report.skipped == {"2": "skip", "4": "output head (skip_head)"}
    assert report.bytes_after < report.bytes_before
    assert quantize(mlp(), config=QuantizeConfig(skip_head=False)).quantized == ["0", "2", "4"]
    with pytest.raises(TargetError, match="typo"):
        quantize(mlp(), skip=["typo"])
    with pytest.raises(ValueError, match="not both: skip_head, embeddings given beside config"):
        quantize(mlp(), skip_head=True, embeddings="keep", config=QuantizeConfig())  # nothing silently ignored
    attached = peftkit.attach(mlp(), LoRA(r=2, targets=["0"]))
    with pytest.raises(ValueError, match="before attaching"):
        quantize(attached)
    packed = mlp()
    packed[0] = NFLinear.from_linear(packed[0], 3)
    with pytest.raises(ValueError, match=r"layers \['0'\] are NF-k / grouped INT4 layers"):
        save_quantized(packed, tmp_path / "base")


def test_selective_deltas_are_refused_on_quantized_layers_and_allowed_elsewhere() -> None:
    model = mlp()
    quantize(model)
    with pytest.raises(ValueError, match=r"module '0'.*stored quantized"):
        peftkit.attach(model, BitFit(targets=["0"]))
    with pytest.raises(ValueError, match=r"lora cannot adapt module .2.: its weight is stored quantized"):
        peftkit.attach(model, LoRA(r=2, targets=["0"], modules_to_save=["2"]))
    assert peftkit.adapters(model) == {}  # nothing half-attached
    peftkit.attach(model, LayerNormTuning(targets=["1"]), "norm")
    peftkit.attach(model, BitFit(targets=["4"]), "head-bias")
    model(torch.randn(2, 128)).sum().backward()
    assert model[1].peftkit["norm"] is not None


def test_train_config_quantizes_the_base_end_to_end(tmp_path) -> None:
    config = tiny_config(tmp_path, model={"name": "tiny-bert", "quantize": "nf4"})
    result = run_training(config)
    layers = quantized_layers(result.model)
    linears = [name for name, layer in layers.items() if isinstance(layer, nn.Linear)]
    assert len(linears) == 13 and "classifier" not in layers  # 2 × (q, k, v, o, ffn in, out) + the pooler; not the head
    assert len(layers) == 16  # and the word, position and token type tables
    assert result.after["loss"] < float("inf") and result.steps > 0
    assert config_from_mapping(config).model.quantize == QuantizeConfig()
    for bad, field in (("nf3", "model.quantize"), ({"scheme": "nf4", "block_size": 3}, "block_size")):
        with pytest.raises(TrainConfigError, match=field):
            config_from_mapping(tiny_config(tmp_path, model={"name": "tiny-bert", "quantize": bad}))


def test_qlora_learns_bbc_on_minilm() -> None:
    config = bbc_config(LoRA(r=8, alpha=16, targets=["query", "value"]), lr=3e-3)
    config = config.model_copy(update={"model": config.model.model_copy(update={"quantize": QuantizeConfig()})})
    result, trained = _run(config, run_training)
    print(f"QLoRA (NF4, double quant) on MiniLM: BBC accuracy {result.accuracy_before:.3f} -> "
          f"{result.accuracy_after:.3f} in {result.train_seconds:.1f}s")
    assert len(quantized_layers(trained.model)) == 40  # 6 layers × 6 Linear + the pooler; 3 embedding tables
    assert result.accuracy_after >= LEARNS
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


# --- embedding tables and a head tied to one -------------------------------------------------------


@pytest.mark.parametrize("embeddings, bound", [("int8", 0.01), ("bf16", 0.003), ("nf4", 0.12)])
def test_embedding_table_rows_are_its_dequantized_table(embeddings, bound) -> None:
    """A lookup gives exactly the rows of the dequantized table, which is within the format's rounding of the float
    table; int8 is codes · absmax_row / 127 with codes = round(127 w / absmax_row)."""
    model = tiny_llama()
    table = model.model.embed_tokens.weight.detach().clone()
    quantize(model, embeddings=embeddings)
    host = model.model.embed_tokens
    ids = torch.tensor([[0, 5, 95], [5, 17, 3]])
    assert torch.equal(host(ids), host.dequantized_weight()[ids]) and torch.equal(host.weight, host.dequantized_weight())
    assert (host.dequantized_weight() - table).norm() / table.norm() < bound
    if embeddings == "int8":
        absmax = table.half().float().abs().amax(1)
        torch.testing.assert_close(host.scales, absmax)
        assert (host.codes.float() - torch.round(table.half().float() * 127 / absmax[:, None])).abs().max() <= 1
        torch.testing.assert_close(host.dequantized_weight(), host.codes.float() * host.scales[:, None] / 127)
    with pytest.raises(AttributeError, match="read-only"):
        host.weight = nn.Parameter(table)


def test_nf4_table_rows_are_bitsandbytes_dequantized_table_rows(monkeypatch) -> None:
    """A lookup dequantizes its rows' double-quantized block absmaxes alone (never the whole table's), bit for bit
    bitsandbytes' dequantization of the whole table (absmaxes in several groups of 256 blocks)."""
    from peftkit.efficient.bnb_embedding import quantized_embedding
    from peftkit.efficient.bnb_linear import bnb

    torch.manual_seed(0)
    embedding = nn.Embedding(600, 128)  # 1200 blocks of 64: their absmaxes in 5 groups of 256
    host = quantized_embedding(embedding, QuantizeConfig(embeddings="nf4"))
    packed, state = bnb.functional.quantize_4bit(embedding.weight.detach().contiguous(), blocksize=64,
                                                 compress_statistics=True, quant_type="nf4")
    table = bnb.functional.dequantize_4bit(packed, state)
    assert torch.equal(host.dequantized_weight(), table)
    ids = torch.tensor([[599, 0, 300], [257, 256, 3]])
    monkeypatch.setattr(bnb.functional, "dequantize_blockwise", None)  # the whole table's absmaxes: not read
    assert torch.equal(host(ids), table[ids]) and torch.equal(host.rows(slice(255, 259)), table[255:259])


def test_tied_head_reads_the_quantized_table_in_chunks_and_saves_none_of_it(monkeypatch) -> None:
    """SmolLM2-style tie: the head and the lookup share one stored table; logits and gradients equal a float model
    holding the dequantized table, with the table dequantized a chunk at a time; nothing of it is kept for the
    backward; LoRA on the table and on the head trains, merges (error reported) and unmerges exactly."""
    from peftkit.efficient import bnb_embedding

    monkeypatch.setattr(bnb_embedding, "HEAD_CHUNK_ROWS", 40)  # 96 rows: chunks of 40, 40, 16
    original = tiny_llama(tied=True)
    quantized = copy.deepcopy(original)
    report = quantize(quantized)
    assert report.tied_heads == {"lm_head": "model.embed_tokens"} and "lm_head" not in report.skipped
    assert not any(p.shape == (96, 64) for p in quantized.parameters())  # no float table left
    twin = float_twin(quantized, original)
    ids = torch.randint(0, 96, (3, 7))
    outputs, grads = [], []
    for model in (quantized, twin):
        torch.manual_seed(1)
        peftkit.attach(model, LoRA(r=4, targets=["embed_tokens", "q_proj", "lm_head"]))
        randomize(model, scale=0.1)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = model(ids).logits
        out.square().mean().backward()
        outputs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)
    assert not any(t.shape == (96, 64) for t in saved)  # the quantized model saved no (dequantized) table
    table = quantized.model.embed_tokens
    stored = table.dequantized_weight()
    for model in (quantized, twin):  # both deltas fold into the one shared table, as in the float tied model
        peftkit.merge(model)
    assert "model.embed_tokens" in quantization_errors(quantized)
    with torch.no_grad():
        assert 0 < (quantized(ids).logits - twin(ids).logits).abs().max() < 0.5  # the re-quantization's rounding
    peftkit.unmerge(quantized)
    assert torch.equal(table.dequantized_weight(), stored) and quantization_errors(quantized) == {}


def test_a_failed_merge_into_a_tied_table_leaves_it_as_stored(monkeypatch) -> None:
    """LoRA on a table and on the head tied to it, the head's fold failing after the table's: the table is put back
    bit for bit, and later merge / unmerge cycles still restore it exactly (the failed merge left nothing behind)."""
    model = tiny_llama(tied=True)
    quantize(model)
    peftkit.attach(model, LoRA(r=4, targets=["embed_tokens", "lm_head"]))
    randomize(model, scale=0.1)
    table = model.model.embed_tokens
    stored = table.dequantized_weight()

    def failing(host: nn.Module) -> None:
        raise RuntimeError("fold failed")

    with monkeypatch.context() as patch:
        patch.setattr(model.lm_head.peftkit["default"], "merge_into", failing)
        with pytest.raises(MergeError, match="fold failed"):
            peftkit.merge(model)
    assert torch.equal(table.dequantized_weight(), stored) and quantization_errors(model) == {}
    for _ in range(2):
        peftkit.merge(model)
        assert set(quantization_errors(model)) == {"model.embed_tokens"}
        peftkit.unmerge(model)
        assert torch.equal(table.dequantized_weight(), stored) and quantization_errors(model) == {}


def test_unmerging_some_of_several_merges_into_a_tied_table_keeps_the_others() -> None:
    """Three adapters with LoRA on a table and its tied head, all merged, unmerged one at a time: the table always
    holds the merges still in (to the re-quantization's rounding), and exactly what it stored when none is left."""
    from peftkit.core.hosts import to_host_layout

    model = tiny_llama(tied=True)
    quantize(model)
    for name in "abc":
        peftkit.attach(model, LoRA(r=2, targets=["embed_tokens", "lm_head"]), name=name)
    randomize(model, scale=0.1)
    peftkit.activate(model, ["a", "b", "c"])
    table = model.model.embed_tokens
    stored = table.dequantized_weight()
    change = {name: to_host_layout(table, table.peftkit[name].delta_weight())
              + model.lm_head.peftkit[name].delta_weight() for name in "abc"}
    peftkit.merge(model, ["a", "b", "c"])
    for done, name in enumerate("cba", start=1):
        peftkit.unmerge(model, name)
        expected = stored + sum(change[n] for n in "abc"[:3 - done])
        assert (table.dequantized_weight() - expected).norm() < 0.1 * change[name].norm(), f"after unmerging {name}"
    assert torch.equal(table.dequantized_weight(), stored) and quantization_errors(model) == {}


def test_prompt_initialised_from_the_vocabulary_reads_the_dequantized_table() -> None:
    model = tiny_llama()
    quantize(model)
    peftkit.attach(model, PromptTuning(num_virtual_tokens=3, init="text", init_token_ids=[4, 9, 95]))
    prompt = model.peftkit["default"].prompt_embeddings
    assert torch.equal(prompt.detach(), model.model.embed_tokens.dequantized_weight()[[4, 9, 95]])


def test_embeddings_option_keeps_or_refuses() -> None:
    kept = tiny_llama(tied=True)
    report = quantize(kept, embeddings="keep")
    assert report.embeddings == [] and report.skipped["lm_head"] == "weight tied to model.embed_tokens.weight"
    assert type(kept.model.embed_tokens) is nn.Embedding
    bf16 = tiny_llama(tied=True).to(torch.bfloat16)
    quantize(bf16)  # lookups and the tied head return the dtype the model computes in
    assert bf16.model.embed_tokens(torch.tensor([1, 2])).dtype == bf16(torch.tensor([[1, 2]])).logits.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="width 64 is not a multiple of block_size 128"):
        quantize(tiny_llama(), embeddings="nf4", block_size=128)
    quantized = tiny_llama()
    quantize(quantized)
    with pytest.raises(ValueError, match="module 'model.embed_tokens'.*stored quantized"):
        peftkit.attach(quantized, LoRA(r=2, targets=["q_proj"], modules_to_save=["embed_tokens"]))
