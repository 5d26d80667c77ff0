"""Ladder side-tuning (#21): the side network's formula, its pruned initialisation, no gradient into (and no graph
through) the frozen backbone, routing, Llama decoders, files, refusals, and learning BBC News."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.core.merging import MergeError
from peftkit.core.registry import adapter_deltas
from peftkit.core.slot import is_delta_parameter
from peftkit.methods import LST
from peftkit.methods.additive.lst import UnsupportedBackboneError, _side_rotary
from tests.bbc import fit_bbc
from tests.train_models import tiny_bert, tiny_llama

TEXTS = ["a short one", "a somewhat longer sentence about sport", "markets fell today", "hi"]


def bert_with_lst(names=("a",), reduction: int = 4):
    torch.manual_seed(0)
    model, tokenizer = tiny_bert(3)
    with torch.no_grad():  # distinct weights, so pruning has something to rank
        for p in model.parameters():
            p.normal_(0, 0.3)
    for name in names:
        peftkit.attach(model, LST(reduction=reduction, modules_to_save=["classifier"]), name=name)
        with torch.no_grad():
            for _, _, delta in adapter_deltas(model, name):
                if hasattr(delta, "gate"):
                    delta.gate.normal_(0, 0.2)
    return model.eval(), tokenizer(TEXTS, return_tensors="pt", padding=True)


def raw_outputs(model, layers) -> dict[int, torch.Tensor]:
    """What each backbone layer computed, before any delta touched it (hooks ahead of the slot's)."""
    seen: dict[int, torch.Tensor] = {}
    model.bert.embeddings.register_forward_hook(lambda m, a, out: seen.__setitem__(0, out), prepend=True)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i + 1, out), prepend=True)
    return seen


def test_side_network_follows_the_ladder_formula() -> None:
    model, batch = bert_with_lst()
    layers = model.bert.encoder.layer
    h = raw_outputs(model, layers)
    last = model.bert(**batch).last_hidden_state
    ladders = [model.bert.encoder.layer[i].peftkit["a"] for i in range(len(layers))]
    tokens = batch["input_ids"].shape[1]
    keep = batch["attention_mask"].bool()[:, None, None, :].expand(-1, 1, tokens, -1)
    mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)  # padded keys masked, as the backbone's
    z = ladders[0].down_input(h[0])  # z_0 = D_0(h_0)
    for i, ladder in enumerate(ladders):
        mu = torch.sigmoid(ladder.gate / 0.1)
        z = ladder.side(mu * ladder.down(h[i + 1]) + (1 - mu) * z, mask)
    torch.testing.assert_close(last, ladders[-1].up(z))
    assert not bool(batch["attention_mask"].all()) and not torch.allclose(last, h[len(layers)])


def test_side_layers_start_from_the_backbone_pruned_by_l1_norm() -> None:
    model, _ = bert_with_lst(reduction=4)
    layer = model.bert.encoder.layer[1]
    side = layer.peftkit["a"].side
    weight, bias = layer.attention.self.query.weight, layer.attention.self.query.bias
    rows = weight.abs().sum(1).topk(4).indices.sort().values
    cols = weight.abs().sum(0).topk(4).indices.sort().values
    torch.testing.assert_close(side.attention.self.query.weight, weight[rows][:, cols])
    torch.testing.assert_close(side.attention.self.query.bias, bias[rows])  # the rows its weight kept
    ffn = layer.intermediate.dense.weight  # [32, 16] -> [8, 4]
    torch.testing.assert_close(side.intermediate.dense.weight,
                               ffn[ffn.abs().sum(1).topk(8).indices.sort().values][:, cols_of(ffn, 4)])
    norm = layer.output.LayerNorm.weight
    torch.testing.assert_close(side.output.LayerNorm.weight, norm[norm.abs().topk(4).indices.sort().values])


@pytest.mark.parametrize("dropout, expected", [("default", 0.0), (None, 0.1), (0.2, 0.2)])
def test_side_attention_dropout_is_zero_by_default_or_the_backbones_on_request(dropout, expected) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32))
    peftkit.attach(model, LST(reduction=4) if dropout == "default" else LST(reduction=4, attention_dropout=dropout))
    assert model.bert.encoder.layer[1].peftkit["default"].side.attention.self.dropout.p == expected
    assert model.bert.encoder.layer[1].attention.self.dropout.p == 0.1


def test_a_quantized_backbone_is_pruned_from_its_dequantized_weights() -> None:
    model, _ = tiny_bert(3)
    peftkit.quantize_int4(model, "all-linear", group_size=16, exclude=["classifier"])
    peftkit.attach(model, LST(reduction=4))
    layer = model.bert.encoder.layer[0]
    weight = layer.attention.self.query.dequantized_weight()
    rows = weight.abs().sum(1).topk(4).indices.sort().values
    torch.testing.assert_close(layer.peftkit["default"].side.attention.self.query.weight,
                               weight[rows][:, cols_of(weight, 4)])


def cols_of(weight: torch.Tensor, size: int) -> torch.Tensor:
    return weight.abs().sum(0).topk(size).indices.sort().values


def test_no_backbone_tensor_gets_a_gradient_or_a_graph() -> None:
    model, batch = bert_with_lst()
    model.train()
    h = raw_outputs(model, model.bert.encoder.layer)
    loss = F.cross_entropy(model(**batch).logits, torch.tensor([0, 1, 2, 1]))
    loss.backward()
    assert all(not out.requires_grad and out.grad_fn is None for out in h.values())  # the backbone ran graph-free
    backbone = {name: p for name, p in model.named_parameters() if not is_delta_parameter(name)}
    assert backbone and all(p.grad is None for p in backbone.values())
    side = {name: p for name, p in model.named_parameters() if is_delta_parameter(name)}
    for part in ("down_input", ".side.", ".down.", ".gate", ".up."):
        assert any(part in name and p.grad is not None and p.grad.abs().sum() > 0 for name, p in side.items()), part


def test_routed_rows_equal_each_row_alone() -> None:
    model, batch = bert_with_lst(("a", "b"))
    rows = ["a", "b", None, "a"]
    with peftkit.routed(model, rows):
        mixed = model(**batch).logits
    for i, name in enumerate(rows):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        if name is None:
            with peftkit.disabled(model):
                alone = model(**one).logits
        else:
            peftkit.activate(model, name)
            alone = model(**one).logits
        torch.testing.assert_close(mixed[i], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-4)


def test_llama_side_layers_use_every_rth_rotary_frequency_and_refuse_a_kv_cache() -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.manual_seed(0)
    model, tokenizer = tiny_llama(None)
    peftkit.attach(model, LST(reduction=4), name="a")
    side = model.model.layers[0].peftkit["a"].side
    positions = torch.arange(7)[None]
    x = torch.zeros(1, 7, 4)
    cos, sin = model.model.rotary_emb(torch.zeros(1, 7, 16), positions)
    side_cos, side_sin = LlamaRotaryEmbedding(config=side.self_attn.config)(x, positions)
    torch.testing.assert_close(_side_rotary(cos, side.self_attn.head_dim), side_cos)
    torch.testing.assert_close(_side_rotary(sin, side.self_attn.head_dim), side_sin)

    batch = tokenizer(["hello there", "a longer greeting than that"], return_tensors="pt", padding=True)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    assert all(p.grad is None for name, p in model.named_parameters() if not is_delta_parameter(name))
    prompt = tokenizer(["hello"], return_tensors="pt")
    assert model.generate(**prompt, max_new_tokens=2, do_sample=False, use_cache=False).shape == (1, 3)
    with pytest.raises(UnsupportedBackboneError, match="keeps no KV cache: generate with use_cache=False"):
        model.generate(**prompt, max_new_tokens=2, do_sample=False)


def test_save_and_load_give_the_same_outputs(tmp_path) -> None:
    model, batch = bert_with_lst()
    expected = model(**batch).logits
    peftkit.save(model, tmp_path / "lst", "a")
    fresh, _ = bert_with_lst(())
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not is_delta_parameter(k)})
    peftkit.load(fresh, tmp_path / "lst")
    torch.testing.assert_close(fresh.eval()(**batch).logits, expected)


def test_unsupported_models_and_settings_are_refused_by_name() -> None:
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(UnsupportedBackboneError, match="GPT2Block.*is neither"):
        peftkit.attach(gpt2, LST(targets=r"h\.\d+", reduction=4))
    model, _ = tiny_bert(3)
    with pytest.raises(UnsupportedBackboneError, match=r"ending with the last one .*got layers \[0\]"):
        peftkit.attach(model, LST(targets=r".*layer\.0", reduction=4))
    with pytest.raises(UnsupportedBackboneError, match="reduction 3 does not divide"):
        peftkit.attach(model, LST(reduction=3))
    peftkit.attach(model, LST(reduction=4))
    with pytest.raises(MergeError, match="no weight delta"):
        peftkit.merge(model)


def test_lst_learns_bbc_news() -> None:
    """LST beats the head alone (same steps and learning rate) and relies on its side network; see tests/bbc.py."""
    result, model, _ = fit_bbc(LST(reduction=8), lr=3e-3)
    assert result.accuracy_after >= 0.75
    assert all(p.grad is None for name, p in model.named_parameters() if not is_delta_parameter(name))
