"""LLaMA-Adapter: the gated prompt-attention formula, zero init, top layers, routing, KV-cache generation,
files, Hugging Face PEFT interop both ways, refused architectures."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM, Qwen3Config,
                          Qwen3Model)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb, repeat_kv

import peftkit
from peftkit import LlamaAdapter
from peftkit.methods.additive.llama_adapter import UnsupportedAttentionError

from .checks import assert_routed_grads_match_rows, assert_routed_matches_rows, model_output, needs_peft
from .conftest import randomize

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)


def _llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(CONFIG).eval()


class Logits(nn.Module):
    """A causal LM returning plain logits, as the shared routing checks expect."""

    def __init__(self, lm: LlamaForCausalLM):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits


def _open_gates(model: nn.Module, name: str | None = None) -> None:
    """Non-zero gates (and fresh prompts) so an adapter really changes outputs."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".peftkit." in pname and (name is None or f".peftkit.{name}." in pname):
                p.copy_(torch.rand_like(p) + 0.5 if pname.endswith("adaption_gate") else torch.randn_like(p))


def test_attention_output_matches_formula() -> None:
    """h + W_o · g · softmax(R(W_q x) (W_k P)ᵀ / √d) (W_v P), written out with transformers' own rotary and GQA code."""
    model = _llama()
    attention = model.model.layers[2].self_attn
    base = copy.deepcopy(attention)
    peftkit.attach(model, LlamaAdapter(adapter_len=5, adapter_layers=1))
    _open_gates(model)
    delta = attention.peftkit["default"]
    x = torch.randn(2, 6, 32)
    cos, sin = LlamaRotaryEmbedding(CONFIG)(x, torch.arange(3, 9).expand(2, 6))  # positions need not start at 0
    with torch.no_grad():
        got = attention(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
        h = base(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
        q = base.q_proj(x).view(2, 6, 4, 8).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        prompt = delta.adaption_prompt  # [1, 5, 32]
        k = repeat_kv(base.k_proj(prompt).view(1, 5, 2, 8).transpose(1, 2), 2)  # [1, 4 heads, 5, 8]
        v = repeat_kv(base.v_proj(prompt).view(1, 5, 2, 8).transpose(1, 2), 2)
        weights = delta.adaption_gate * torch.softmax(q @ k.transpose(2, 3) / 8 ** 0.5, dim=-1)
        expected = h + base.o_proj((weights @ v).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, h, atol=1e-3)


def test_zero_gate_is_exactly_the_base_and_the_gate_gets_a_gradient() -> None:
    model, ids = _llama(), torch.randint(0, 64, (2, 7))
    before = model_output(model, ids)
    peftkit.attach(model, LlamaAdapter(adapter_len=4, adapter_layers=2))
    assert torch.equal(model(ids).logits, before)
    model(ids).logits.square().sum().backward()
    gates = [p.grad for n, p in model.named_parameters() if n.endswith("adaption_gate")]
    prompts = [p.grad for n, p in model.named_parameters() if n.endswith("adaption_prompt")]
    assert len(gates) == 2 and all(g.abs().sum() > 0 for g in gates)  # training can start from g = 0
    assert all(torch.count_nonzero(g) == 0 for g in prompts)  # ... and the prompts follow once g moves


def test_adapts_only_the_top_layers() -> None:
    model = _llama()
    peftkit.attach(model, LlamaAdapter(adapter_len=4, adapter_layers=2))
    assert list(peftkit.summary(model).per_module["default"]) == ["model.layers.1.self_attn", "model.layers.2.self_attn"]
    assert peftkit.summary(model).per_adapter["default"] == 2 * (4 * 32 + 1)
    with pytest.raises(ValueError, match="adapter_layers=4 but targets .* match only 3"):
        peftkit.attach(_llama(), LlamaAdapter(adapter_layers=4))


@pytest.mark.parametrize(("make", "targets", "problem"), [
    (lambda: BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)), ["attention.self"], "submodules are"),
    (lambda: GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)), ["attn"], "submodules are"),
    # Qwen3 normalises queries and keys: an adapter without q_norm would be silently wrong, so it is refused
    (lambda: Qwen3Model(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)), ["self_attn"], "q_norm"),
])
def test_other_attention_is_refused_by_name(make, targets: list[str], problem: str) -> None:
    with pytest.raises(ValueError, match=f"LLaMA-Adapter supports Llama-family attention.*{problem}") as err:
        peftkit.attach(make(), LlamaAdapter(adapter_layers=1, targets=targets))
    assert isinstance(err.value.__cause__, UnsupportedAttentionError)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_llama_family_models(family: str) -> None:
    """Mistral and Qwen2 (biased q, k, v) share Llama's attention: exact zero init, then the gate acts."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    model = model_class(config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 64, (2, 6))
    before = model_output(model, ids)
    peftkit.attach(model, LlamaAdapter(adapter_len=3, adapter_layers=2))
    assert torch.equal(model_output(model, ids), before)
    _open_gates(model)
    assert not torch.allclose(model_output(model, ids), before, atol=1e-3)


def test_a_delta_reading_the_call_differently_cannot_share_the_attention() -> None:
    model = _llama()
    peftkit.attach(model, LlamaAdapter(adapter_layers=1), name="a")
    with pytest.raises(ValueError, match="reads the call of module 'model.layers.2.self_attn' differently .*\\(a\\)"):
        peftkit.attach(model, peftkit.LoRA(r=2, targets=["q_proj"], modules_to_save=["model.layers.2.self_attn"]), name="b")
    assert list(peftkit.adapters(model)) == ["a"]


def test_merge_is_a_named_error() -> None:
    model = _llama()
    peftkit.attach(model, LlamaAdapter(adapter_layers=1))
    with pytest.raises(peftkit.MergeError, match="cannot merge adapter 'default' \\(llama_adapter\\).*depends on the input"):
        peftkit.merge(model)


def _two_adapters() -> Logits:
    model = Logits(_llama())
    peftkit.attach(model, LlamaAdapter(adapter_len=4, adapter_layers=2), name="a")
    peftkit.attach(model, LlamaAdapter(adapter_len=3, adapter_layers=3), name="b")
    _open_gates(model)
    return model


ROWS = ["a", None, "b", "a", "b", None]


def test_routed_batch_equals_each_row_alone() -> None:
    model, ids = _two_adapters(), torch.randint(0, 64, (6, 5))
    assert_routed_matches_rows(model, ids, ROWS)
    grads = assert_routed_grads_match_rows(model, ids, ROWS)
    assert any(".peftkit.a.adaption_prompt" in n for n in grads) and any(".peftkit.b.adaption_gate" in n for n in grads)


def test_cached_generation_equals_uncached_also_routed() -> None:
    model = _two_adapters()
    lm, prompt = model.lm, torch.randint(3, 64, (3, 6))
    settings = {"max_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones_like(prompt), "pad_token_id": 0}
    with peftkit.routed(model, ["a", "b", None]):
        cached = lm.generate(prompt, use_cache=True, **settings)
        uncached = lm.generate(prompt, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    alone = []
    for row, name in enumerate(["a", "b"]):
        peftkit.activate(model, name)
        alone.append(lm.generate(prompt[row:row + 1], use_cache=True, **{**settings, "attention_mask": None}))
    assert torch.equal(cached[:2], torch.cat(alone))
    assert not torch.equal(alone[0], alone[1])


def test_save_load_round_trip(tmp_path) -> None:
    model, ids = _llama(), torch.randint(0, 64, (2, 7))
    base = copy.deepcopy(model)
    peftkit.attach(model, LlamaAdapter(adapter_len=4, adapter_layers=2))
    _open_gates(model)
    peftkit.save(model, tmp_path / "adapter")
    peftkit.load(base, tmp_path / "adapter")
    assert torch.equal(model_output(base, ids), model_output(model, ids))


@needs_peft
def test_saved_for_peft_runs_the_same_in_peft(tmp_path) -> None:
    from peft import PeftModel

    model, ids = _llama(), torch.randint(0, 64, (2, 7))
    base = copy.deepcopy(model)
    peftkit.attach(model, LlamaAdapter(adapter_len=4, adapter_layers=2))
    _open_gates(model)
    peftkit.save(model, tmp_path / "peft", format="peft")
    theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    torch.testing.assert_close(model_output(theirs, {"input_ids": ids}), model_output(model, ids))


@needs_peft
def test_peft_adapter_loads_and_runs_the_same(tmp_path) -> None:
    from peft import AdaptionPromptConfig, get_peft_model

    base, ids = _llama(), torch.randint(0, 64, (2, 7))
    theirs = get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(adapter_len=4, adapter_layers=2,
                                                                      task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.8)
    theirs.save_pretrained(tmp_path / "peft")
    peftkit.load(base, tmp_path / "peft")
    assert peftkit.adapters(base)["default"] == LlamaAdapter(adapter_len=4, adapter_layers=2)
    torch.testing.assert_close(model_output(base, ids), model_output(theirs, {"input_ids": ids}))


def test_targets_peft_cannot_express_are_refused_for_peft(tmp_path) -> None:
    model = _llama()
    peftkit.attach(model, LlamaAdapter(adapter_layers=1, targets=r".*\.self_attn"))
    with pytest.raises(ValueError, match="selects attention modules by one attribute name"):
        peftkit.save(model, tmp_path / "peft", format="peft")
    peftkit.attach(model, LlamaAdapter(adapter_layers=1, modules_to_save=["lm_head"]), name="head")
    with pytest.raises(ValueError, match="adaption prompt config has no modules_to_save"):
        peftkit.save(model, tmp_path / "peft", name="head", format="peft")
    assert not (tmp_path / "peft").exists()


def _chat_losses(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum(model(**batch).loss.item() for batch in batches) / len(batches)


def _qa_batches(tokenizer, pairs, size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Question/answer lines, padded on the left; the loss ignores the padding."""
    tokenizer.padding_side = "left"
    batches = []
    for start in range(0, len(pairs), size):
        chunk = pairs[start:start + size]
        texts = [f"Question: {q}\nAnswer: {a}{tokenizer.eos_token}" for q, a in zip(chunk["question"], chunk["answer"])]
        batch = dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=48))
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batches.append(batch)
    return batches


def test_smollm2_starts_at_the_base_generates_with_cache_and_learns_chatterbot() -> None:
    """SmolLM2-135M (a real Llama): exact zero init, cached == uncached greedy tokens, held-out loss falls."""
    from peftkit.data import load_chatterbot_splits
    from peftkit.models import load_smollm2

    model, tokenizer = load_smollm2()
    splits = load_chatterbot_splits(seed=0)
    train = _qa_batches(tokenizer, splits["train"].shuffle(seed=0).select(range(96)))
    test = _qa_batches(tokenizer, splits["test"].shuffle(seed=0).select(range(32)))
    with torch.no_grad():
        base_logits = model(**{k: v for k, v in test[0].items() if k != "labels"}).logits
    peftkit.attach(model, LlamaAdapter(adapter_len=10, adapter_layers=8))
    assert torch.equal(model_output(model, {k: v for k, v in test[0].items() if k != "labels"}), base_logits)
    before = _chat_losses(model, test)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in train:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    after = _chat_losses(model, test)
    with peftkit.disabled(model):  # the control: no head trains here, so the adapter off is the base itself
        off = _chat_losses(model, test)
    print(f"llama_adapter: SmolLM2 chatterbot held-out loss {before:.3f} -> {after:.3f} (adapter off {off:.3f})")
    assert abs(off - before) < 1e-4
    # measured 3.95 -> 3.51; the held-out pairs and the base are fixed, so the whole gap is the adapter's
    assert after < off - 0.2
    prompt = tokenizer(["Question: What is AI?\nAnswer:"], return_tensors="pt")
    cached = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=False))


def test_merging_lora_into_the_projections_it_reads_is_refused() -> None:
    """LLaMA-Adapter runs its prompts through the layer's own q/k/v/o weights: LoRA folded into them would move it."""
    model = _llama()
    peftkit.attach(model, peftkit.LoRA(r=2, targets=["o_proj", "v_proj"]), name="lora")
    peftkit.attach(model, LlamaAdapter(adapter_layers=1), name="prompts", activate=False)
    randomize(model)
    peftkit.activate(model, ["lora", "prompts"])
    with pytest.raises(peftkit.MergeError, match="'prompts' \\(LlamaAdapterDelta\\).*reads the base weights"):
        peftkit.merge(model, "lora")
