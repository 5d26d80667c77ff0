"""A peftkit adapter trains under Hugging Face's `transformers.Trainer` unchanged: attach, pass the model."""
from __future__ import annotations

import torch

import peftkit
from tests.train_models import tiny_bert


def test_hf_trainer_updates_only_the_adapter(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    model, tokenizer = tiny_bert(num_labels=3)
    peftkit.attach(model, peftkit.LoRA(r=4, targets=["query", "value"]), name="hf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = ["good film", "bad film", "so so", "great", "awful", "fine"] * 2
    encoded = tokenizer(texts, padding="max_length", max_length=8, truncation=True)
    rows = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i], "labels": i % 3}
            for i in range(len(texts))]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=rows).train()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapter = {k for k in before if ".peftkit.hf." in k}
    assert changed and changed <= adapter
    b_factors = {k for k in adapter if k.endswith("lora_B")}
    assert b_factors and b_factors <= changed  # B starts at zero: it moved
    peftkit.save(model, tmp_path / "adapter", name="hf")
    fresh, _ = tiny_bert(num_labels=3)
    fresh.load_state_dict({k: v for k, v in before.items() if ".peftkit." not in k})
    assert peftkit.load(fresh, tmp_path / "adapter") == "hf"
    ids = torch.tensor(rows[0]["input_ids"])[None]
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
