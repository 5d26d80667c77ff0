"""`peftkit eval`, `peftkit predict` and what `peftkit train` prints, through `peftkit.cli.main` in-process, on the
tests' tiny registered models: the numbers a command reports are the trained model's own, and each bad input is
one `peftkit: error:` line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from peftkit.train import run_training

from tests.test_cli_tools import _run
from tests.train_models import local, tiny_config, write

CSV = "text,label\n" + "".join(f"{'good fine great' if i % 2 else 'bad awful poor'} {i},{'pos' if i % 2 else 'neg'}\n"
                               for i in range(24))


def _error(capsys, *argv: str) -> str:
    """The command fails with exit 2 and exactly one `peftkit: error:` line (notes may come first)."""
    code, out, err = _run(capsys, *argv)
    lines = [line for line in err.splitlines() if not line.startswith("peftkit: note:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("peftkit: error: "), err
    return lines[0]


def _config_file(tmp_path: Path, config: dict, name: str = "config.yaml") -> str:
    return str(write(tmp_path / name, yaml.safe_dump(config)))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[str, object]:
    """A tiny-bert LoRA run on a local CSV with eval and test files: (config file, result)."""
    tmp_path = tmp_path_factory.mktemp("lora")
    data = write(tmp_path / "data.csv", CSV)
    test = write(tmp_path / "test.csv", CSV.replace("great", "nice"))
    config = local(tmp_path, data, eval=str(data), test=str(test))
    return _config_file(tmp_path, config), run_training(config)


def test_eval_reports_the_saved_adapters_own_metrics(lora_run, capsys) -> None:
    config, result = lora_run
    code, out, _ = _run(capsys, "eval", config, "--adapter", str(result.adapter_dir), "--json")
    assert code == 0 and json.loads(out) == {"split": "eval", "rows": 24, **result.after}
    code, out, _ = _run(capsys, "eval", config, "--adapter", str(result.adapter_dir), "--split", "test")
    assert code == 0 and out == f"test (24 rows): accuracy {result.test['accuracy']:.3f}, loss {result.test['loss']:.3f}\n"


def test_predict_gives_the_models_labels_and_probabilities(lora_run, tmp_path, capsys) -> None:
    config, result = lora_run
    texts = ["good fine great 101", "bad awful poor 102", "neither"]
    inputs = write(tmp_path / "inputs.txt", "\n".join(texts) + "\n\n")
    output = tmp_path / "predictions.jsonl"
    code, out, err = _run(capsys, "predict", config, "--adapter", str(result.adapter_dir), "--input", str(inputs),
                          "--output", str(output))
    assert code == 0 and out == "" and f"3 predictions written to {output}" in err
    records = [json.loads(line) for line in output.read_text().splitlines()]
    processor = result.processor
    with torch.inference_mode():
        probs = result.model(**processor(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
    assert [r["text"] for r in records] == texts
    for record, row in zip(records, probs, strict=True):
        assert record["label"] == result.labels[int(row.argmax())]
        assert record["probabilities"] == pytest.approx(dict(zip(result.labels, row.tolist())), abs=1e-5)
    csv_inputs = write(tmp_path / "inputs.csv", "text,other\n" + "".join(f"{t},x\n" for t in texts))
    code, out, _ = _run(capsys, "predict", config, "--adapter", str(result.adapter_dir), "--input", str(csv_inputs))
    assert code == 0 and [json.loads(line) for line in out.splitlines()] == records  # standard output by default


def test_eval_and_predict_bad_input_is_one_line(lora_run, tmp_path, capsys) -> None:
    config, result = lora_run
    adapter = str(result.adapter_dir)
    assert "adapter directory" in _error(capsys, "eval", config, "--adapter", str(tmp_path / "nope"))
    assert "holds no adapter" in _error(capsys, "eval", config, "--adapter", str(tmp_path))
    assert "holds a lora adapter, but the config's method is ia3" in _error(
        capsys, "eval", config, "--adapter", adapter, "--set", "method.method=ia3")
    three = write(tmp_path / "three.csv", "text,label\na,x\nb,y\nc,z\n")  # another label count: another head
    assert "classifier.module.weight has shape (2, 16) in the file but (3, 16)" in _error(
        capsys, "eval", config, "--adapter", adapter, "--set", f"data.train={three}", "--set", f"data.eval={three}",
        "--set", "data.test=null")
    assert "the config has no test split: set data.test" in _error(
        capsys, "eval", config, "--adapter", adapter, "--set", "data.test=null", "--split", "test")
    empty = write(tmp_path / "empty.txt", "\n \n")
    assert f"input file {empty} holds no inputs" in _error(capsys, "predict", config, "--adapter", adapter,
                                                           "--input", str(empty))
    assert "has no column 'text'; columns: a, b" in _error(
        capsys, "predict", config, "--adapter", adapter, "--input", str(write(tmp_path / "x.csv", "a,b\n1,2\n")))
    assert "--max-new-tokens must be at least 1" in _error(
        capsys, "predict", config, "--adapter", adapter, "--input", str(empty), "--max-new-tokens", "0")
    image = _config_file(tmp_path, {**tiny_config(tmp_path), "task": "classify-image", "model": {"name": "tiny-bert"},
                                    "data": {"name": "fashion-mnist"}}, "image.yaml")
    assert "task classify-image predicts on an image file, a folder of images or a .txt file" in _error(
        capsys, "predict", image, "--adapter", adapter, "--input", str(tmp_path / "x.csv"))


def test_full_finetune_round_trip_through_eval(tmp_path, capsys) -> None:
    """`method: full` from the command line: the saved model scores what the best epoch scored."""
    config = _config_file(tmp_path, tiny_config(tmp_path, schedule={"epochs": 3}, optimizer={"lr": 0.05}))
    code, out, err = _run(capsys, "train", config, "--set", "method.method=full")
    assert code == 0 and "peftkit: note: method lora -> full: dropped r, targets (full has no such keys)" in err
    assert "tiny-bert + full() on bbc-news" in out and f"full fine-tuned model saved to {tmp_path / 'run' / 'adapter'}" in out
    best = next(line for line in out.splitlines() if line.startswith("best epoch"))
    code, out, _ = _run(capsys, "eval", config, "--set", "method.method=full", "--adapter", str(tmp_path / "run" / "adapter"),
                        "--json")
    metrics = json.loads(out)
    assert code == 0 and f"accuracy {metrics['accuracy']:.3f}, loss {metrics['loss']:.3f}" in best
    assert "holds a full fine-tune, but the config's method is lora" in _error(
        capsys, "eval", config, "--adapter", str(tmp_path / "run" / "adapter"))


def test_chat_predict_answers_as_the_trained_model_generates(tmp_path, capsys) -> None:
    pairs = [{"question": f"what is {i} plus one?", "answer": f"{i + 1}"} for i in range(8)]
    data = write(tmp_path / "chat.jsonl", "\n".join(json.dumps(p) for p in pairs))
    config = {**local(tmp_path, data, max_length=48), "task": "causal-lm-chat", "model": {"name": "tiny-llama"}}
    config["method"] = {"method": "lora", "r": 2, "targets": ["q_proj", "v_proj"]}
    result = run_training(config)
    prompts = ["what is 3 plus one?", "hello"]
    inputs = write(tmp_path / "prompts.jsonl", "\n".join(json.dumps({"question": p}) for p in prompts))
    code, out, _ = _run(capsys, "predict", _config_file(tmp_path, config), "--adapter", str(result.adapter_dir),
                        "--input", str(inputs), "--max-new-tokens", "5")
    records = [json.loads(line) for line in out.splitlines()]
    tokenizer = result.processor
    expected = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        out_ids = result.model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        expected.append(tokenizer.decode(out_ids[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert code == 0 and records == [{"prompt": p, "response": r} for p, r in zip(prompts, expected, strict=True)]


# --- what `peftkit train` prints ----------------------------------------------------------------------------------

def test_train_says_what_it_loads_and_reports_last_best_and_test(tmp_path, capsys) -> None:
    data = write(tmp_path / "data.csv", CSV)
    config = _config_file(tmp_path, {**local(tmp_path, data, eval=str(data), test=str(data)), "progress": True})
    code, out, err = _run(capsys, "train", config, "--epochs", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"reading data: train {data}, eval {data}, test {data} ..."
    assert lines[1] == "loading model tiny-bert and encoding the data ..."
    assert "(24 train / 24 eval / 24 test rows, 2 labels: neg, pos)" in lines[2]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "eval"][-1]
    test = next(r for r in records if r["kind"] == "test")
    assert f"last epoch 2 (step {last['step']}): accuracy {last['accuracy']:.3f}, loss {last['loss']:.3f}" in out
    assert "best epoch " in out and "by eval accuracy" in out
    assert f"test (the best epoch's weights, scored once): accuracy {test['accuracy']:.3f}" in out
    assert "eval: " in err and "test: " in err  # the evaluation progress bars


def test_methods_names_full_finetuning(capsys) -> None:
    code, out, _ = _run(capsys, "methods")
    assert code == 0 and "`method: full`: full fine-tuning, every base parameter trained" in out.splitlines()[-1]


def test_train_errors_are_one_line(tmp_path, capsys, monkeypatch) -> None:
    no_method = tiny_config(tmp_path)
    del no_method["method"]
    assert _error(capsys, "train", _config_file(tmp_path, no_method)) == \
        "peftkit: error: invalid training config: method: Field required"
    assert "lora: unknown keys 'rank' (did you mean 'rank_pattern'?), 'alfa'" in _error(
        capsys, "train", _config_file(tmp_path, tiny_config(tmp_path)), "--set", "method.rank=2", "--set", "method.alfa=1")
    from peftkit.methods import MaskNotSelectedError

    def unselected(*args, **kwargs):
        raise MaskNotSelectedError("this selective adapter has no mask yet: choose one with peftkit.select(model, "
                                   "name, batches) before running or training it")

    monkeypatch.setattr("peftkit.train.run_training", unselected)
    assert "has no mask yet" in _error(capsys, "train", _config_file(tmp_path, tiny_config(tmp_path)))
