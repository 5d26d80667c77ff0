"""The training loop: gradient accumulation equals one large batch, best-checkpoint selection and early
stopping, the metrics file, bf16 autocast, gradient checkpointing, and local JSONL / CSV / folder data."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peftkit.train import Trainer, TrainConfigError, config_from_mapping, prepare, run_training
from tests.train_models import local, tiny_config, write

CHAT = {"task": "causal-lm-chat", "model": {"name": "tiny-llama"}, "data": {"name": "chatterbot", "max_length": 80},
        "method": {"method": "lora", "r": 2, "targets": ["q_proj", "v_proj"]}}


def adapter_tensors(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.adapter_dir / "adapter.safetensors"))


@pytest.mark.parametrize("task", ["classify-text", "causal-lm-chat"])
def test_grad_accumulation_equals_one_large_batch(tmp_path, task) -> None:
    """accum 2 x batch 4 == batch 8: the chat loss is a mean over answer tokens of the whole group, not of each
    micro-batch (their token counts differ), so this only holds with the group-wide normaliser."""
    base = CHAT if task == "causal-lm-chat" else {}
    runs = {}
    for batch, accum in ((8, 1), (4, 2)):
        config = tiny_config(tmp_path / f"{batch}x{accum}", **base, schedule={"epochs": 1, "batch_size": batch,
                                                                               "grad_accum": accum})
        config["data"].update(train_limit=32, eval_limit=8)
        config["optimizer"] = {"lr": 1e-2, "name": "sgd"}  # SGD: the update is the gradient itself
        runs[accum] = run_training(config)
    assert runs[1].steps == runs[2].steps == 4
    one, two = adapter_tensors(runs[1]), adapter_tensors(runs[2])
    b_factors = [k for k in one if k.endswith("lora_B")]
    assert b_factors and all(one[k].abs().max() > 0 for k in b_factors)  # B starts at zero: it trained
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)


class ScriptedEval(Trainer):
    """Eval accuracy follows a script: best after epoch 2, then two worse epochs."""

    script = iter([0.2, 0.5, 0.7, 0.6, 0.65, 0.9, 0.9])

    def evaluate(self):
        return {"loss": 1.0, "accuracy": next(self.script)} if self.data.eval is not None else None


def test_best_checkpoint_and_early_stopping(tmp_path) -> None:
    config = config_from_mapping(tiny_config(tmp_path, schedule={"epochs": 6, "batch_size": 8},
                                             eval={"patience": 2}, optimizer={"lr": 5e-2}))
    model, processor, task, data = prepare(config)
    result = ScriptedEval(model, task, data, config).fit()  # 16 rows / 8 = 2 steps per epoch
    assert result.stopped_early and result.epochs == 4 and result.steps == 8
    assert result.best == {"metric": "accuracy", "value": 0.7, "step": 4, "epoch": 2,
                           "metrics": {"loss": 1.0, "accuracy": 0.7}}
    assert result.after == result.best["metrics"]
    checkpoints = tmp_path / "run" / "checkpoints"
    best, last = (load_file(str(checkpoints / w / "adapter.safetensors")) for w in ("best", "last"))
    final = adapter_tensors(result)
    assert all(torch.equal(final[k], best[k]) for k in final)  # the exported adapter is the best epoch's
    assert any(not torch.equal(final[k], last[k]) for k in final)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["accuracy"] for r in records if r["kind"] == "eval"] == [0.2, 0.5, 0.7, 0.6, 0.65]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 and r["lr"] > 0 for r in records if r["kind"] == "train")


def test_max_steps_stops_mid_epoch_and_evaluates(tmp_path) -> None:
    result = run_training(tiny_config(tmp_path, schedule={"epochs": 3, "batch_size": 4, "max_steps": 3}))
    assert (result.steps, result.epochs) == (3, 0) and result.after is not None


def test_bf16_autocast_on_cpu_when_asked(tmp_path) -> None:
    result = run_training(tiny_config(tmp_path, precision="bf16", device="cpu"))
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.after["loss"]))
    assert all(t.dtype == torch.float32 for t in adapter_tensors(result).values())  # weights stay fp32


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path) -> None:
    runs = [run_training(tiny_config(tmp_path / str(on), **{**CHAT, "model": {"name": "tiny-llama",
                                                                              "gradient_checkpointing": on}}))
            for on in (False, True)]
    assert runs[1].model.is_activation_checkpointing and not runs[0].model.is_activation_checkpointing
    plain, checkpointed = adapter_tensors(runs[0]), adapter_tensors(runs[1])
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_on_a_model_without_it_is_an_error(tmp_path) -> None:
    config = tiny_config(tmp_path, task="classify-image", model={"name": "efficientnet-lite0",
                                                                 "gradient_checkpointing": True},
                         method={"method": "lora", "r": 2, "targets": ["_conv_head"]},
                         data={"name": "fashion-mnist", "train_limit": 8, "eval_limit": 8, "image_size": 32})
    with pytest.raises(TrainConfigError, match="does not support it"):
        run_training(config)


def test_local_jsonl_and_csv_with_string_labels(tmp_path) -> None:
    lines = [{"text": f"{word} " * 3, "label": label} for word, label in
             [("goal", "sport"), ("rain", "weather"), ("match", "sport"), ("sun", "weather")] * 4]
    train = write(tmp_path / "train.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n")
    test = write(tmp_path / "test.csv", "text,label\ngoal goal,sport\nrain rain,weather\n")
    result = run_training(local(tmp_path, train, eval=str(test)))
    assert result.labels == ["sport", "weather"]  # inferred, sorted
    assert result.steps == 2 and set(result.after) == {"loss", "accuracy"}


def test_local_text_folder_and_eval_fraction(tmp_path) -> None:
    for label, words in (("neg", ["bad", "awful", "poor"]), ("pos", ["good", "great", "fine"])):
        (tmp_path / "reviews" / label).mkdir(parents=True)
        for i, word in enumerate(words * 3):
            write(tmp_path / "reviews" / label / f"{i}.txt", f"a {word} film\n")
    result = run_training(local(tmp_path, tmp_path / "reviews", eval_fraction=0.25))
    assert result.labels == ["neg", "pos"]
    assert result.steps == 2  # 18 rows: 13 train (batch 8), 5 eval


def test_local_chat_jsonl(tmp_path) -> None:
    pairs = [{"prompt": f"What is {i} plus one?", "response": f"{i + 1}."} for i in range(12)]
    train = write(tmp_path / "chat.jsonl", "\n".join(json.dumps(p) for p in pairs))
    config = local(tmp_path, train, prompt_column="prompt", response_column="response", eval_fraction=0.25,
                   max_length=64)
    result = run_training({**config, **{k: v for k, v in CHAT.items() if k != "data"}})
    assert result.labels is None and set(result.after) == {"loss"} and result.steps == 2


def test_save_off_keeps_no_checkpoint_or_adapter(tmp_path) -> None:
    """output.save false: the run trains and logs, writes no checkpoints or adapter, and cannot be resumed."""
    config = tiny_config(tmp_path, schedule={"epochs": 1, "batch_size": 8}, eval={"restore_best": False},
                         output={"dir": str(tmp_path / "run"), "save": False})
    result = run_training(config)
    assert result.steps == 2 and result.adapter_dir is None
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "adapter").exists()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    with pytest.raises(TrainConfigError, match="output.save false"):
        run_training(config, resume=True)
