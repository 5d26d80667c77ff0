"""Image folders (torchvision's ImageFolder layout) for classify-image: reading, cropping, the errors a user meets,
normalisation by the model, and train / eval / predict from the command line on a tiny random ViT ("tiny-vit")."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from peftkit.data import list_image_folder, load_images
from peftkit.models import EFFICIENTNET_LITE0_INPUT, IMAGENET_MEAN, IMAGENET_STD, VIT_SMALL_INPUT, ImageInput
from peftkit.train import register_model
from peftkit.train.config import DataSection
from peftkit.train.tasks import ClassifyImage, DataError

from tests.test_cli_tools import _run
from tests.train_models import tiny_config

COLOURS = {"blue": (30, 40, 210), "red": (220, 30, 40)}


def tiny_vit(num_labels: int | None) -> tuple[torch.nn.Module, ImageInput]:
    from transformers import Dinov2Config, Dinov2ForImageClassification

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=28,
                          patch_size=7, num_labels=num_labels or 2)
    return Dinov2ForImageClassification(config), ImageInput(IMAGENET_MEAN, IMAGENET_STD, patch=7)


register_model("tiny-vit", tiny_vit, head=("classifier",))


def write_folder(root: Path, per_label: int, seed: int, labels: tuple[str, ...] = ("blue", "red")) -> Path:
    """root/<label>/<i>.png|jpg: noisy images of the label's colour, of assorted sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    for label in labels:
        (root / label).mkdir(parents=True)
        for i in range(per_label):
            height, width = rng.integers(14, 40, size=2)
            pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 25, (height, width, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / label / f"{i}.{'jpg' if i == 0 else 'png'}")
    return root


# --- reading ---------------------------------------------------------------------------------------------


def test_image_folder_lists_sorted_labels_and_files(tmp_path) -> None:
    root = write_folder(tmp_path / "train", 3, seed=0)
    (root / "red" / ".DS_Store").write_bytes(b"\0")  # hidden files are passed over
    paths, ids, labels = list_image_folder(root)
    assert labels == ["blue", "red"]
    assert [p.relative_to(root).as_posix() for p in paths] == ["blue/0.jpg", "blue/1.png", "blue/2.png",
                                                               "red/0.jpg", "red/1.png", "red/2.png"]
    assert ids == [0, 0, 0, 1, 1, 1]


def test_load_images_keeps_the_centre_square_resized(tmp_path) -> None:
    """A 60 x 20 image with green | red | blue columns (10 | 40 | 10 wide): only red is left of the centre 20 x 20
    (and of the margin the bicubic filter reads around it)."""
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :10], wide[:, 10:50], wide[:, 50:] = (0, 255, 0), (255, 0, 0), (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(np.full((9, 9), 77, np.uint8), mode="L").save(tmp_path / "grey.png")  # greyscale -> RGB
    pixels = load_images([tmp_path / "wide.png", tmp_path / "grey.png"], size=8)
    assert pixels.shape == (2, 3, 8, 8) and pixels.dtype == torch.uint8
    assert torch.equal(pixels[0], torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8))
    assert torch.equal(pixels[1], torch.full((3, 8, 8), 77, dtype=torch.uint8))


def _read(tmp_path: Path, **data) -> object:
    return ClassifyImage().read_data(DataSection(**{"train": str(tmp_path / "train"), "image_size": 28, **data}), 0)


def test_bad_image_folders_are_named(tmp_path) -> None:
    with pytest.raises(DataError, match=r"train data: image folder .*train does not exist"):
        _read(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="has no label folders; expected root/<label>/<image>"):
        _read(tmp_path)
    (tmp_path / "train" / "red").mkdir()
    with pytest.raises(DataError, match=r"image folder .*red holds no images"):
        _read(tmp_path)
    write_folder(tmp_path / "other", 2, seed=1)
    notes = tmp_path / "other" / "red" / "notes.txt"
    notes.write_text("not a picture")
    with pytest.raises(DataError, match=rf"{notes} is not an image file \(known suffixes: .bmp"):
        _read(tmp_path, train=str(tmp_path / "other"))
    notes.unlink()
    (tmp_path / "other" / "labels.csv").write_text("x")
    with pytest.raises(DataError, match=r"holds file\(s\) outside a label folder \(labels.csv\)"):
        _read(tmp_path, train=str(tmp_path / "other"))


def test_an_unreadable_image_and_unknown_labels_are_named(tmp_path) -> None:
    write_folder(tmp_path / "train", 2, seed=0)
    broken = tmp_path / "train" / "red" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=rf"train data: {broken} is not a readable image"):
        _read(tmp_path)
    broken.unlink()
    write_folder(tmp_path / "eval", 2, seed=1)
    (tmp_path / "eval" / "green").mkdir()
    (tmp_path / "eval" / "blue" / "0.jpg").rename(tmp_path / "eval" / "green" / "0.jpg")
    with pytest.raises(DataError, match=r"eval data .*eval has label folder\(s\) \['green'\] missing from the train "
                                        r"data \(labels: blue, red\)"):
        _read(tmp_path, eval=str(tmp_path / "eval"))
    with pytest.raises(DataError, match=r"train data .*train has label folder\(s\) \['red'\] missing from data.labels"):
        _read(tmp_path, labels=["blue", "green"])


def test_splits_limits_and_declared_label_order(tmp_path) -> None:
    write_folder(tmp_path / "train", 5, seed=0)
    raw = _read(tmp_path, eval_fraction=0.2, train_limit=6, labels=["red", "blue", "green"])
    assert raw.labels == ["red", "blue", "green"]  # the declared order, a label without images kept
    assert raw.train["pixels"].shape == (6, 3, 28, 28) and raw.eval["pixels"].shape == (2, 3, 28, 28)
    assert set(raw.train["labels"].tolist()) | set(raw.eval["labels"].tolist()) == {0, 1}
    again = _read(tmp_path, eval_fraction=0.2, train_limit=6, labels=["red", "blue", "green"])
    assert torch.equal(again.eval["pixels"], raw.eval["pixels"])  # seeded
    with pytest.raises(DataError, match="fashion-mnist brings its own test split"):
        ClassifyImage().read_data(DataSection(name="fashion-mnist", test=str(tmp_path / "train")), 0)


# --- normalisation by the model ----------------------------------------------------------------------------


@pytest.mark.parametrize("image_input", [VIT_SMALL_INPUT, EFFICIENTNET_LITE0_INPUT])
def test_batches_are_normalised_as_the_model_says(image_input: ImageInput) -> None:
    """Grey level v: every pixel of channel c is (v / 255 - mean_c) / std_c, for folder RGB and Fashion-MNIST grey."""
    task = ClassifyImage()
    task.use_model(image_input, DataSection(name="fashion-mnist", image_size=28))
    rgb = {"pixels": torch.full((2, 3, 28, 28), 100, dtype=torch.uint8), "labels": torch.tensor([0, 1])}
    grey = {"pixels": torch.full((2, 14, 14), 100, dtype=torch.uint8), "labels": torch.tensor([0, 1])}  # resized
    expected = torch.tensor([(100 / 255 - m) / s for m, s in zip(image_input.mean, image_input.std)])
    for rows in (rgb, grey):
        batch = task.collate(rows, torch.tensor([1]))
        assert batch["pixels"].shape == (1, 3, 28, 28) and batch["labels"].tolist() == [1]
        torch.testing.assert_close(batch["pixels"], expected.view(1, 3, 1, 1).expand(1, 3, 28, 28))


def test_image_size_must_fit_the_patches_and_the_model_must_say_how_it_reads() -> None:
    task = ClassifyImage()
    with pytest.raises(DataError, match="data.image_size 100 is not a multiple of the model's patch size 14"):
        task.use_model(VIT_SMALL_INPUT, DataSection(name="fashion-mnist", image_size=100))
    with pytest.raises(DataError, match=r"peftkit.models.ImageInput\(mean, std\)\), here \(model, NoneType\)"):
        task.use_model(None, DataSection(name="fashion-mnist"))


# --- train, eval, predict from the command line --------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny-vit LoRA (plus head) trained on a red/blue folder by `peftkit train`: (config, adapter, test folder)."""
    tmp_path = tmp_path_factory.mktemp("folder")
    folders = {split: write_folder(tmp_path / split, n, seed) for split, n, seed in
               (("train", 8, 0), ("eval", 3, 1), ("test", 4, 2))}
    config = tiny_config(tmp_path, task="classify-image", model={"name": "tiny-vit"},
                         method={"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"]},
                         data={"name": None, "train": str(folders["train"]), "eval": str(folders["eval"]),
                               "test": str(folders["test"]), "image_size": 28, "train_limit": None,
                               "eval_limit": None},
                         schedule={"epochs": 4, "batch_size": 4}, optimizer={"lr": 0.05})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp_path / "run" / "adapter", folders["test"]


def test_train_learns_the_folder_and_eval_scores_its_test_split(trained, capsys) -> None:
    config, adapter, _ = trained
    code, out, err = _run(capsys, "train", str(config))
    assert code == 0, err
    assert "(16 train / 6 eval / 8 test rows, 2 labels: blue, red)" in out and adapter.is_dir()
    before, after = map(float, re.search(r"eval accuracy before: ([\d.]+)  after: ([\d.]+)", out).groups())
    assert before <= 0.5 and after == 1.0, out  # the random model labels one colour everywhere; trained, none wrong
    code, out, _ = _run(capsys, "eval", str(config), "--adapter", str(adapter), "--split", "test", "--json")
    metrics = json.loads(out)
    assert code == 0 and metrics["rows"] == 8 and metrics["accuracy"] == 1.0, metrics


def test_predict_on_a_folder_a_list_and_one_image(trained, tmp_path, capsys) -> None:
    config, adapter, test = trained
    if not adapter.is_dir():
        _run(capsys, "train", str(config))
    code, out, err = _run(capsys, "predict", str(config), "--adapter", str(adapter), "--input", str(test))
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0, err
    assert [Path(r["image"]).relative_to(test).as_posix() for r in records] == \
        [f"{label}/{name}" for label in ("blue", "red") for name in ("0.jpg", "1.png", "2.png", "3.png")]
    for record in records:  # the trained model labels every test image right (eval's accuracy 1.0)
        assert record["label"] == Path(record["image"]).parent.name
        assert set(record["probabilities"]) == {"blue", "red"}
        assert abs(sum(record["probabilities"].values()) - 1) < 1e-5
    listing = tmp_path / "images.txt"
    listing.write_text(f"{test / 'red' / '1.png'}\n\n{test.name}/blue/2.png\n".replace(str(test.parent) + "/", ""))
    (tmp_path / test.name).symlink_to(test)  # relative paths are read from the list's folder
    code, out, _ = _run(capsys, "predict", str(config), "--adapter", str(adapter), "--input", str(listing))
    listed = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["label"] for r in listed] == ["red", "blue"]
    by_path = {Path(r["image"]).relative_to(test).as_posix(): r for r in records}
    assert listed[0]["probabilities"] == by_path["red/1.png"]["probabilities"]  # batch-independent
    code, out, _ = _run(capsys, "predict", str(config), "--adapter", str(adapter), "--input", str(test / "red" / "3.png"))
    assert code == 0 and json.loads(out)["probabilities"] == by_path["red/3.png"]["probabilities"]


def test_predict_names_bad_image_inputs(trained, tmp_path, capsys) -> None:
    config, adapter, test = trained
    missing = tmp_path / "list.txt"
    missing.write_text("nowhere.png\n")
    for argument, message in ((missing, f"image file {tmp_path / 'nowhere.png'} does not exist"),
                              (tmp_path / "table.csv", "classify-image predicts on an image file, a folder of images"),
                              (tmp_path, "is not an image file")):
        code, _, err = _run(capsys, "predict", str(config), "--adapter", str(adapter), "--input", str(argument))
        assert code == 2 and message in err, err
