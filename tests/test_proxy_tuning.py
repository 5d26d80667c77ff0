"""Proxy-tuning: every generated step's scores equal base + α (tuned − untuned) computed from whole-sequence forward
passes (separate small models, or one model with an adapter on and off; padded prompts too), α = 0 leaves greedy
generation as the base's, and mismatched vocabularies are refused by name."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.compose import ProxyTuning, VocabularyError, proxy_generate

from .conftest import randomize

PAD = 0


def _llama(vocab: int = 48, hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD)
    return LlamaForCausalLM(config).eval()


def _small_with_adapter() -> LlamaForCausalLM:
    small = _llama(hidden=16, seed=1)
    peftkit.attach(small, peftkit.LoRA(r=4, targets=["q_proj", "v_proj", "down_proj"]), name="tuned")
    randomize(small, scale=0.5)
    return small


def _last_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[:, -1].float()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the second one left-padded by two."""
    ids = torch.tensor([[5, 9, 3, 17, 22], [PAD, PAD, 7, 30, 2]])
    return ids, (ids != PAD).long()


@pytest.mark.parametrize("pair", ["adapter", "two models"])
def test_each_steps_scores_equal_the_formula(pair: str) -> None:
    base, small = _llama(), _small_with_adapter()
    alpha = 0.7
    if pair == "adapter":
        options = {"tuned": small, "adapter": "tuned"}
    else:
        untuned = _llama(hidden=16, seed=1)  # the same small model without the adapter, as a separate model
        options = {"tuned": small, "untuned": untuned}
    ids, mask = _prompts()
    out = proxy_generate(base, alpha=alpha, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=PAD, **options)
    assert len(out.scores) == 6
    for row, start in ((0, 0), (1, 2)):  # each row alone, without its padding
        for step, scores in enumerate(out.scores):
            seq = out.sequences[row:row + 1, start:ids.shape[1] + step]
            peftkit.activate(small, "tuned")
            tuned = _last_logits(small, seq)
            with peftkit.disabled(small):
                bare = _last_logits(small, seq)
            expected = _last_logits(base, seq) + alpha * (tuned - bare)
            torch.testing.assert_close(scores[row:row + 1], expected, rtol=1e-4, atol=1e-4)
            assert not torch.allclose(tuned, bare, atol=1e-3)  # the steering is not zero


def test_alpha_zero_leaves_greedy_generation_as_the_bases() -> None:
    base, small = _llama(), _small_with_adapter()
    ids, mask = _prompts()
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD}
    plain = base.generate(**kwargs)
    assert torch.equal(proxy_generate(base, small, adapter="tuned", alpha=0.0, **kwargs), plain)
    assert not torch.equal(proxy_generate(base, small, adapter="tuned", alpha=3.0, **kwargs), plain)


def test_a_reused_processor_restarts_on_new_prompts() -> None:
    base, small = _llama(), _small_with_adapter()
    proxy = ProxyTuning(small, adapter="tuned")
    first = base.generate(input_ids=torch.tensor([[4, 8, 15]]), max_new_tokens=4, do_sample=False,
                          logits_processor=[proxy], pad_token_id=PAD)
    again = base.generate(input_ids=torch.tensor([[4, 8, 15]]), max_new_tokens=4, do_sample=False,
                          logits_processor=[proxy], pad_token_id=PAD)
    assert torch.equal(first, again)


def test_mismatched_vocabularies_and_bad_arguments_are_refused() -> None:
    base, small = _llama(), _small_with_adapter()
    ids = torch.tensor([[4, 8, 15]])
    other = _llama(vocab=64, hidden=16)
    with pytest.raises(VocabularyError, match="base model scores 48 tokens, the small models 64"):
        proxy_generate(base, other, adapter=None, untuned=_llama(vocab=64, hidden=16, seed=2), input_ids=ids,
                       max_new_tokens=2, pad_token_id=PAD)
    with pytest.raises(VocabularyError, match="tuned model scores 48 tokens, the untuned one 64"):
        proxy_generate(base, small, untuned=other, input_ids=ids, max_new_tokens=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match="not both or neither"):
        ProxyTuning(small)
    with pytest.raises(peftkit.UnknownAdapterError, match="no adapter named 'chat'"):
        ProxyTuning(small, adapter="chat")
    proxy = ProxyTuning(small, adapter="tuned", attention_mask=torch.ones(1, 2, dtype=torch.long))  # another prompt's
    with pytest.raises(ValueError, match="attention_mask given has shape \\(1, 2\\)"):
        base.generate(input_ids=ids, max_new_tokens=2, logits_processor=[proxy], pad_token_id=PAD)


def test_the_bundled_decoder_and_its_adapter_steer_its_own_bare_self() -> None:
    """SmolLM2 as base (bare, generating inside peftkit.disabled) and as the pair (with its adapter on and off):
    base = untuned, so α = 1 gives the tuned model's own greedy generation and α = 0 the bare model's."""
    from peftkit.models import load_smollm2

    model, tokenizer = load_smollm2()
    model.eval()
    peftkit.attach(model, peftkit.LoRA(r=8, targets=["q_proj", "v_proj"]), name="tuned")
    randomize(model, scale=0.3)
    tokenizer.padding_side = "left"
    batch = tokenizer(["The capital of France is", "Once upon a time, in a small"], return_tensors="pt",
                      padding=True)
    kwargs = {**batch, "max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    tuned = model.generate(**kwargs)
    with peftkit.disabled(model):
        bare = model.generate(**kwargs)
        steered = {alpha: proxy_generate(model, model, adapter="tuned", alpha=alpha, **kwargs) for alpha in (0.0, 1.0)}
    assert not torch.equal(tuned, bare)
    assert torch.equal(steered[0.0], bare) and torch.equal(steered[1.0], tuned)
