"""Prompt tuning and P-tuning: the written formula, inits, routed mixed batches (with module deltas),
padding, files, errors, and Hugging Face PEFT interop (outputs equal peft's on the same inputs)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

import peftkit
from peftkit import IA3, LoRA, Bottleneck, PrefixTuning, PromptTuning, PTuning, SequenceError, SequenceLengthError

from .checks import needs_peft
from .conftest import TinyNet, randomize
from .sequence_checks import (VOCAB, assert_routed_grads, assert_routed_rows, logits, tiny_bert, tiny_gpt2,
                              tiny_llama)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (5, 6))


# --- the formula ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_prompt_is_prepended_embeddings(make, ids: torch.Tensor) -> None:
    """h = f([P; E(x)]): the adapted model equals the bare model fed the concatenated embeddings."""
    model = make()
    peftkit.attach(model, PromptTuning(num_virtual_tokens=3))
    prompt = model.peftkit["default"].prompt_embeddings
    embeds = torch.cat([prompt.expand(len(ids), -1, -1), model.get_input_embeddings()(ids)], 1)
    with torch.no_grad():
        got = logits(model, ids)
        with peftkit.disabled(model):
            expected = model(inputs_embeds=embeds).logits
            assert not torch.allclose(logits(model, ids), got[:, -ids.shape[1]:] if got.dim() == 3 else got, atol=1e-3)
    torch.testing.assert_close(got, expected)


def test_inits_vocab_and_text() -> None:
    model = tiny_bert()
    table = model.get_input_embeddings().weight
    peftkit.attach(model, PromptTuning(num_virtual_tokens=5, init="text", init_token_ids=[7, 3]), name="text")
    torch.testing.assert_close(model.peftkit["text"].prompt_embeddings, table[[7, 3, 7, 3, 7]])
    peftkit.attach(model, PromptTuning(num_virtual_tokens=4, init="vocab"), name="vocab")
    vocab_rows = model.peftkit["vocab"].prompt_embeddings
    assert all((table == row).all(-1).any() for row in vocab_rows)  # every start value is some token's embedding
    tokenizer = lambda text: {"input_ids": [ord(c) % VOCAB for c in text]}
    assert PromptTuning.from_text("abc", tokenizer, num_virtual_tokens=2).init_token_ids == [17, 18, 19]
    with pytest.raises(ValueError, match="vocabulary has 40"):
        peftkit.attach(model, PromptTuning(init="text", init_token_ids=[VOCAB]), name="bad")


@pytest.mark.parametrize("fields, match", [({"init": "text"}, "needs init_token_ids"),
                                            ({"init_token_ids": [1]}, "only used with init='text'"),
                                            ({"num_virtual_tokens": 0}, "greater than 0"),
                                            ({"exclude": ["x"]}, "no exclude")])
def test_config_errors(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PromptTuning(**fields)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_prompt_is_the_encoder_output_and_saves_encoded(encoder: str, ids: torch.Tensor, tmp_path) -> None:
    model = tiny_llama()
    peftkit.attach(model, PTuning(num_virtual_tokens=4, encoder=encoder, encoder_hidden_size=8))
    delta = model.peftkit["default"]
    tokens = delta.embedding if encoder == "mlp" else delta.lstm_head(delta.embedding[None])[0][0]
    torch.testing.assert_close(delta.virtual(), delta.mlp_head(tokens))  # g(P)
    expected = logits(model, ids)
    peftkit.save(model, tmp_path / "pt")
    fresh = copy.deepcopy(model)
    peftkit.remove(fresh, "default")
    peftkit.load(fresh, tmp_path / "pt")
    assert peftkit.adapters(fresh)["default"].encoded
    assert [n for n, _ in fresh.peftkit["default"].named_parameters()] == ["prompt_embeddings"]  # encoder discarded
    torch.testing.assert_close(logits(fresh, ids), expected)


# --- routing and padding -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_bert, tiny_llama, tiny_gpt2])
def test_routed_prompts_of_different_lengths_equal_rows_alone(make, ids: torch.Tensor) -> None:
    model = make()
    peftkit.attach(model, PromptTuning(num_virtual_tokens=2), name="short")
    peftkit.attach(model, PTuning(num_virtual_tokens=5, encoder_hidden_size=8), name="long")
    peftkit.attach(model, PrefixTuning(num_virtual_tokens=3), name="prefix")
    rows = ["long", None, "short", "prefix", "long"]
    assert_routed_rows(model, ids, rows)
    assert_routed_grads(model, ids, rows)


def test_sequence_deltas_compose_with_module_deltas_in_one_routed_batch(ids: torch.Tensor) -> None:
    """LoRA, (IA)3, a bottleneck adapter, a prompt, a prefix and the bare base: each row equals running alone."""
    model = tiny_llama()
    peftkit.attach(model, LoRA(r=2, targets=["q_proj", "v_proj"]), name="lora")
    peftkit.attach(model, IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]), name="ia3")
    peftkit.attach(model, Bottleneck.preset("pfeiffer", bottleneck=4), name="adapter")
    peftkit.attach(model, PromptTuning(num_virtual_tokens=4), name="prompt")
    peftkit.attach(model, PrefixTuning(num_virtual_tokens=2), name="prefix")
    randomize(model, "lora")
    randomize(model, "adapter")
    randomize(model, "ia3", scale=0.5)
    rows = ["prompt", "lora", None, "prefix", "adapter", "ia3"]
    ids = torch.randint(1, VOCAB, (len(rows), 6))
    assert_routed_rows(model, ids, rows)
    assert_routed_grads(model, ids, rows)


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_padded_rows_equal_the_same_rows_unpadded(make) -> None:
    """Positions count real tokens only: a padded row (left for causal models, right for BERT) equals it unpadded."""
    model = make()
    peftkit.attach(model, PromptTuning(num_virtual_tokens=3))
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    causal = make is tiny_llama
    mask[1, :2] = 0 if causal else 1
    mask[1, -2:] = 1 if causal else 0
    padded = logits(model, ids, attention_mask=mask)
    real = ids[1, 2:] if causal else ids[1, :-2]
    single = logits(model, real[None])[0]
    if causal:  # [virtual tokens][the user's pads][real tokens]: compare the row's own positions
        padded, single = padded[1, [0, 1, 2, 5, 6, 7, 8]], single
    else:
        padded = padded[1]
    torch.testing.assert_close(padded, single, rtol=1e-5, atol=1e-5)


def test_labels_and_token_types_are_extended() -> None:
    model = tiny_llama()
    peftkit.attach(model, PromptTuning(num_virtual_tokens=3))
    ids = torch.randint(1, VOCAB, (2, 5))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape[1] == 8
    # virtual positions carry label -100; the last virtual token predicts the first real one
    shifted = torch.nn.functional.cross_entropy(out.logits[:, 2:-1].reshape(-1, VOCAB), ids.reshape(-1))
    torch.testing.assert_close(out.loss, shifted)
    bert = tiny_bert()
    peftkit.attach(bert, PromptTuning(num_virtual_tokens=3))
    types = torch.ones_like(ids)
    with torch.no_grad():
        got = bert(input_ids=ids, token_type_ids=types).logits
        prompt = bert.peftkit["default"].prompt_embeddings.expand(2, -1, -1)
        with peftkit.disabled(bert):
            expected = bert(inputs_embeds=torch.cat([prompt, bert.get_input_embeddings()(ids)], 1),
                            token_type_ids=torch.cat([torch.zeros(2, 3, dtype=torch.long), types], 1)).logits
    torch.testing.assert_close(got, expected)


# --- adapters as objects -------------------------------------------------------------------------------------------

def test_save_load_remove_summary_and_merge_error(ids: torch.Tensor, tmp_path) -> None:
    model = tiny_bert()
    base = logits(model, ids)
    peftkit.attach(model, PromptTuning(num_virtual_tokens=4, init="vocab"), name="a")
    peftkit.attach(model, PromptTuning(num_virtual_tokens=2), name="b")
    assert peftkit.summary(model).per_adapter == {"a": 4 * 16, "b": 2 * 16}
    assert [p.shape for p in peftkit.adapter_parameters(model, "a")] == [(4, 16)]
    peftkit.activate(model, "a")
    out_a = logits(model, ids)
    peftkit.save(model, tmp_path / "a", name="a")
    with pytest.raises(ValueError, match="cannot merge adapter 'a'"):
        peftkit.merge(model, "a")
    with pytest.raises(SequenceError, match="both add virtual tokens"):
        peftkit.activate(model, ["a", "b"])
        logits(model, ids)
    fresh = tiny_bert()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".peftkit." not in f".{k}"})
    peftkit.load(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh, ids), out_a)
    peftkit.remove(model, "a")
    peftkit.remove(model, "b")
    torch.testing.assert_close(logits(model, ids), base)
    assert not model._forward_pre_hooks  # the input rewrite left with the last sequence adapter


def test_named_errors(ids: torch.Tensor) -> None:
    with pytest.raises(SequenceError, match="no input embeddings"):
        peftkit.attach(TinyNet(), PromptTuning())
    model = tiny_bert()  # 32 positions
    peftkit.attach(model, PromptTuning(num_virtual_tokens=30))
    with pytest.raises(SequenceLengthError, match="30 virtual tokens plus the input need 36 positions"):
        logits(model, ids)
    with pytest.raises(SequenceError, match="routing names 2 rows but the model got 5 rows"):
        with peftkit.routed(model, ["default", None]):
            logits(model, ids)
    with pytest.raises(SequenceError, match="2-D attention_mask"):
        logits(model, ids, attention_mask=torch.ones(5, 1, 6, 6))


# --- Hugging Face PEFT interop -------------------------------------------------------------------------------------

PEFT_CONFIGS = {  # kind: (the peft module, task type) -> peft's config (peft is imported in the tests)
    "prompt": lambda peft, task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3, prompt_tuning_init="RANDOM"),
    "p_tuning_mlp": lambda peft, task: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=8),
    "p_tuning_lstm": lambda peft, task: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=8,
                                                                 encoder_reparameterization_type="LSTM"),
    "prefix": lambda peft, task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3),
    "prefix_projection": lambda peft, task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3,
                                                                    prefix_projection=True, encoder_hidden_size=8),
}


@needs_peft
@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
@pytest.mark.parametrize("make, task", [(tiny_bert, "SEQ_CLS"), (tiny_llama, "CAUSAL_LM")])
def test_peft_interop_outputs_match_peft(kind: str, make, task: str, ids: torch.Tensor, tmp_path) -> None:
    """A peft-trained adapter loads here with peft's outputs; ours saved in PEFT format loads in peft likewise."""
    import peft
    base = make()
    theirs = peft.get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[kind](peft, task)).eval()
    with torch.no_grad():  # move peft's trainable state away from its start (zero classifier rows etc.)
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    mask = torch.ones_like(ids)
    expected = theirs(input_ids=ids, attention_mask=mask).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    peftkit.load(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours, ids, attention_mask=mask), expected, rtol=1e-5, atol=1e-5)
    randomize(ours, scale=0.5)  # new values, so the way back is tested on numbers peft never had
    ours_out = logits(ours, ids, attention_mask=mask)
    peftkit.save(ours, tmp_path / "ours", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits, ours_out, rtol=1e-5, atol=1e-5)
    with peftkit.disabled(ours):
        assert not torch.allclose(logits(ours, ids, attention_mask=mask)[..., -1, :] if task == "CAUSAL_LM"
                                  else logits(ours, ids, attention_mask=mask), ours_out[..., -1, :]
                                  if task == "CAUSAL_LM" else ours_out, atol=1e-4)


def tiny_roberta() -> RobertaForSequenceClassification:
    """RoBERTa numbers positions from padding_idx + 1 (here 2), with pads at padding_idx."""
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=34, num_labels=3, pad_token_id=1)
    return RobertaForSequenceClassification(config).eval()


@needs_peft
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_roberta_positions_follow_its_numbering(kind: str, tmp_path) -> None:
    """A peft adapter on RoBERTa gives peft's outputs here (peft leaves RoBERTa to number the positions), and a
    right-padded row equals the same row unpadded (its pads take RoBERTa's pad position)."""
    import peft
    base = tiny_roberta()
    ids = torch.randint(3, VOCAB, (2, 6))
    theirs = peft.get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[kind](peft, "SEQ_CLS")).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    peftkit.load(ours, tmp_path / "peft")
    mask = torch.ones_like(ids)
    torch.testing.assert_close(logits(ours, ids, attention_mask=mask), theirs(input_ids=ids, attention_mask=mask).logits,
                               rtol=1e-5, atol=1e-5)
    mask[1, -2:] = 0
    padded = logits(ours, ids, attention_mask=mask)[1]
    torch.testing.assert_close(padded, logits(ours, ids[1:, :-2])[0], rtol=1e-5, atol=1e-5)


def test_encoder_rows_run_one_pass_per_prompt_length(ids: torch.Tensor) -> None:
    """A routed encoder batch with prompts of 2 and 5 tokens and none runs three passes of its own lengths (no row is
    padded for another's prompt), returns the one-pass layout, and equals each row alone; with labels (one loss over
    the batch) it runs one padded pass; a deep copy runs its own weights; removing the prompts removes the buckets."""
    model = tiny_bert()
    peftkit.attach(model, PromptTuning(num_virtual_tokens=2), name="short")
    peftkit.attach(model, PromptTuning(num_virtual_tokens=5), name="long")
    peftkit.attach(model, PrefixTuning(num_virtual_tokens=3), name="prefix")
    randomize(model)
    rows = ["long", None, "short", "prefix", "long"]
    lengths = []  # (rows, tokens) of every pass through the encoder
    model.bert.embeddings.register_forward_hook(lambda module, args, out: lengths.append(tuple(out.shape[:2])))
    root_calls = []
    model.register_forward_hook(lambda module, args, out: root_calls.append(out[0].shape))
    with peftkit.routed(model, rows):
        out = model(input_ids=ids, output_hidden_states=True)
    assert sorted(lengths) == [(1, 8), (2, 6), (2, 11)]  # none and the prefix: 6 tokens; short: 2 + 6; long: 5 + 6
    assert root_calls == [(5, 3)]  # the root's hooks see the one call and its merged outputs
    assert out.logits.shape == (5, 3) and out.hidden_states[-1].shape == (5, 11, 16)
    with peftkit.routed(model, rows):  # tuple outputs merge alike
        torch.testing.assert_close(model(input_ids=ids, return_dict=False)[0], out.logits)
    assert_routed_rows(model, ids, rows)
    lengths.clear()
    with peftkit.routed(model, rows):
        model(input_ids=ids, labels=torch.zeros(5, dtype=torch.long))
    assert lengths == [(5, 11)]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.peftkit["long"].parameters():
            p.mul_(-3.0)
    with peftkit.routed(twin, rows):
        assert not torch.allclose(twin(input_ids=ids).logits[0], out.logits[0], atol=1e-4)
    for name in ("short", "long", "prefix"):
        peftkit.remove(model, name)
    model(input_ids=ids)
    assert "forward" not in model.__dict__
