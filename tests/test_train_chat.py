"""Instruction tuning data: the chat template, and a loss on the answer tokens only (checked by hand)."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from peftkit.train.tasks import CausalLMChat, chat_rows
from tests.train_models import llama_tokenizer, tiny_llama


def test_labels_are_minus_100_exactly_on_the_prompt_and_padding() -> None:
    tokenizer = llama_tokenizer()
    questions, answers = ["What is AI?", "Hello"], ["A field of computer science.", "Hi there, how are you?"]
    rows = chat_rows(tokenizer, questions, answers, max_length=64)
    for i, (question, answer) in enumerate(zip(questions, answers)):
        user = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], tokenize=False)
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        n, p = len(full_ids), len(prompt_ids)
        assert rows["input_ids"][i, :n].tolist() == full_ids
        assert rows["attention_mask"][i].tolist() == [1] * n + [0] * (64 - n)
        labels = rows["labels"][i].tolist()
        assert labels[:p] == [-100] * p and labels[n:] == [-100] * (64 - n)
        assert labels[p:n] == full_ids[p:]
        assert tokenizer.decode(labels[p:n]) == f"{answer}<|im_end|>\n"


def test_truncation_keeps_the_prompt_masked() -> None:
    rows = chat_rows(llama_tokenizer(), ["Tell me a story"], ["Once upon a time " * 20], max_length=40)
    assert rows["attention_mask"][0].all() and (rows["labels"][0] != -100).sum() > 0


def test_row_loss_is_cross_entropy_over_answer_tokens_only() -> None:
    torch.manual_seed(0)
    model, tokenizer = tiny_llama(None)
    rows = chat_rows(tokenizer, ["Hi", "What time is it?"], ["Hello!", "Noon."], max_length=64)
    task = CausalLMChat()
    batch = task.collate(rows, torch.arange(2))
    stats = task.row_stats(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i in range(2):
        answer = (rows["labels"][i] != -100).nonzero().flatten().tolist()
        by_hand = sum(F.cross_entropy(logits[i, t - 1], rows["input_ids"][i, t], reduction="sum") for t in answer)
        torch.testing.assert_close(stats.loss_sum[i], by_hand)
        assert stats.units[i] == len(answer)
