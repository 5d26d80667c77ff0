"""Prefix tuning / P-tuning v2: the written formula (keys and values in every layer), generation with a
key/value cache (prefix put in once, cached == uncached), left-padded batches, the MLP reparameterization,
encoders and decoders. Routing, files and PEFT interop are in test_prompt_tuning.py (all sequence methods)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import peftkit
from peftkit import LoRA, PrefixTuning, PromptTuning

from .conftest import randomize
from .sequence_checks import VOCAB, assert_routed_rows, logits, tiny_bert, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama, tiny_gpt2])
def test_prefix_is_every_layers_leading_keys_and_values(make) -> None:
    """The adapted model equals the bare one given a cache of [P_k^l; P_v^l] per layer, a mask over them and
    positions after them."""
    model = make()
    peftkit.attach(model, PrefixTuning(num_virtual_tokens=3))
    prefix = model.peftkit["default"].virtual()  # [n, layers, 2, kv heads, head size]
    assert prefix.shape[:3] == (3, 2, 2)
    ids = torch.randint(1, VOCAB, (2, 5))
    cache = DynamicCache()
    for layer in range(prefix.shape[1]):
        key, value = (prefix[:, layer, i].permute(1, 0, 2).expand(2, -1, -1, -1) for i in (0, 1))
        cache.update(key, value, layer)
    with torch.no_grad():
        got = logits(model, ids)
        with peftkit.disabled(model):
            expected = model(input_ids=ids, past_key_values=cache, attention_mask=torch.ones(2, 8, dtype=torch.long),
                             position_ids=torch.arange(3, 8).expand(2, -1)).logits
            assert not torch.allclose(logits(model, ids), got, atol=1e-3)
    torch.testing.assert_close(got, expected)


def test_projection_trains_through_the_mlp_and_saves_the_prefix(tmp_path) -> None:
    model = tiny_llama()
    peftkit.attach(model, PrefixTuning(num_virtual_tokens=3, projection=True, encoder_hidden_size=8))
    delta = model.peftkit["default"]
    torch.testing.assert_close(delta.virtual().flatten(1), delta.mlp(delta.embedding))  # P = MLP(E)
    ids = torch.randint(1, VOCAB, (2, 5))
    logits(model, ids).sum().backward()
    assert delta.embedding.grad is not None and delta.mlp[0].weight.grad is not None
    expected = logits(model, ids)
    peftkit.save(model, tmp_path / "prefix")
    fresh = copy.deepcopy(model)
    peftkit.remove(fresh, "default")
    peftkit.load(fresh, tmp_path / "prefix")
    assert not peftkit.adapters(fresh)["default"].projection
    assert peftkit.summary(fresh).per_adapter["default"] == 3 * 2 * 2 * 8  # n · layers · (k, v) · kv width
    torch.testing.assert_close(logits(fresh, ids), expected)


def test_prefix_on_encoder_rows_of_different_lengths() -> None:
    model = tiny_bert()
    peftkit.attach(model, PrefixTuning(num_virtual_tokens=2), name="short")
    peftkit.attach(model, PrefixTuning(num_virtual_tokens=6, projection=True), name="long")
    assert_routed_rows(model, torch.randint(1, VOCAB, (4, 5)), ["short", "long", None, "long"])


# --- generation ----------------------------------------------------------------------------------------------------

def _generate(model, ids, mask, use_cache: bool) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                          pad_token_id=0)


@pytest.mark.parametrize("config", [PrefixTuning(num_virtual_tokens=3), PromptTuning(num_virtual_tokens=3)])
def test_cached_and_uncached_greedy_decoding_agree_and_the_prefix_is_computed_once(config, monkeypatch) -> None:
    model = tiny_llama()
    peftkit.attach(model, config)
    randomize(model, scale=2.0)  # non-zero, large enough to change the greedy tokens
    ids = torch.randint(1, VOCAB, (2, 4))
    mask = torch.ones_like(ids)
    delta = model.peftkit["default"]
    calls = []
    virtual = type(delta).virtual
    monkeypatch.setattr(type(delta), "virtual", lambda self: calls.append(1) or virtual(self))
    cached = _generate(model, ids, mask, use_cache=True)
    assert len(calls) == 1  # put in the cache once, not recomputed per generated token
    uncached = _generate(model, ids, mask, use_cache=False)
    assert len(calls) == 1 + 6
    assert torch.equal(cached, uncached)
    with peftkit.disabled(model):
        assert not torch.equal(_generate(model, ids, mask, use_cache=True), cached)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_left_padded_routed_generation_equals_rows_alone(make) -> None:
    """A left-padded batch mixing a prefix, a prompt and the bare base generates what each row generates alone."""
    model = make()
    peftkit.attach(model, PrefixTuning(num_virtual_tokens=3), name="prefix")
    peftkit.attach(model, PromptTuning(num_virtual_tokens=2), name="prompt")
    randomize(model, scale=2.0)
    ids = torch.randint(1, VOCAB, (3, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :1] = 0
    rows = ["prefix", "prompt", None]
    with peftkit.routed(model, rows):
        batch = _generate(model, ids, mask, use_cache=True)[:, 5:]
    alone = []
    for row, name in enumerate(rows):
        real = ids[row, mask[row].bool()][None]
        with peftkit.routed(model, [name]):
            alone.append(_generate(model, real, torch.ones_like(real), use_cache=True)[0, real.shape[1]:])
    assert torch.equal(batch, torch.stack(alone))
    assert len({tuple(t.tolist()) for t in alone}) == 3


def test_routed_beam_search_equals_rows_alone() -> None:
    """generate expands every row into its beams (and returned sequences) in place; routing follows, so each row's
    beams keep its adapter, whichever kind (prefix, prompt, LoRA, none)."""
    model = tiny_llama()
    peftkit.attach(model, PrefixTuning(num_virtual_tokens=3), name="prefix")
    peftkit.attach(model, PromptTuning(num_virtual_tokens=2), name="prompt")
    peftkit.attach(model, LoRA(r=2, targets=["q_proj", "v_proj"]), name="lora")
    randomize(model, scale=2.0)
    ids = torch.randint(1, VOCAB, (4, 5))
    rows = ["prefix", "prompt", "lora", None]
    beams = {"max_new_tokens": 5, "num_beams": 3, "num_return_sequences": 2, "do_sample": False, "pad_token_id": 0}
    with peftkit.routed(model, rows):
        batch = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **beams)[:, 5:]
    alone = []
    for row, name in enumerate(rows):
        with peftkit.routed(model, [name]):
            alone.append(model.generate(input_ids=ids[row:row + 1], attention_mask=torch.ones_like(ids[:1]), **beams)[:, 5:])
    assert torch.equal(batch, torch.cat(alone))
    assert len({tuple(t.tolist()) for t in batch[::2]}) == 4  # the adapters make each row's best beam differ
