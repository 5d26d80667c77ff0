"""Training tasks: how a model, its data, its loss and its metric are obtained for each kind of job.

A task turns a data section into `Rows` (a dict of tensors sharing their first dimension, encoded
once), forms batches from row indices, says what the model is called with (`inputs`) and scores the
model's output *per row* (`loss_stats` -> `RowStats`), so the training engine can normalise a loss
over a whole accumulation group and share one forward pass between several adapters' batches. Models come from the `MODELS` registry, tasks from `TASKS`; both accept new entries.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .. import data as bundled_sets
from .. import models as bundled_models
from ..efficient.quantize import QuantizeConfig
from .config import DataSection, ModelSection

if TYPE_CHECKING:
    from datasets import Dataset

Rows = dict[str, torch.Tensor]  # every tensor has the same first dimension: one entry per example
ModelInputs = dict[str, torch.Tensor] | torch.Tensor  # keyword tensors, or one positional tensor


class DataError(ValueError):
    """Training data that cannot be used: missing file, empty set, unknown column, label outside the declared set."""


@dataclass
class RowStats:
    """A batch scored per row: summed loss, loss units (1 per row, or answer tokens), correct predictions."""

    loss_sum: torch.Tensor  # [B]
    units: torch.Tensor  # [B]
    correct: torch.Tensor | None = None  # [B] bool, classification only


@dataclass
class RawData:
    """What `Task.read_data` found, checked, before any model is loaded."""

    train: Any  # a datasets.Dataset, or Rows for tasks whose data is already tensors
    eval: Any | None
    labels: list[str] | None  # class names (classification)
    test: Any | None = None  # data.test: scored once, after training


@dataclass
class TaskData:
    train: Rows
    eval: Rows | None
    labels: list[str] | None
    test: Rows | None = None


def num_rows(rows: Rows) -> int:
    return next(iter(rows.values())).shape[0]


def model_logits(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """Call the model with `inputs` (keywords or one positional tensor); its logits (`.logits` when it has them)."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return getattr(out, "logits", out)


# --- models --------------------------------------------------------------------------------------

# num_labels -> (model, processor): a tokenizer (text), an ImageInput (images), or None
ModelBuilder = Callable[[int | None], tuple[nn.Module, Any]]


@dataclass(frozen=True)
class ModelSpec:
    build: ModelBuilder
    head: tuple[str, ...] = ()  # modules freshly initialised for the task: trained whole when model.train_head
    # (num_labels, QuantizeConfig) -> (model, tokenizer or None) with a quantized base (a cached one); None: build,
    # then quantize with the head left in full precision
    build_quantized: Callable[[int | None, QuantizeConfig], tuple[nn.Module, Any]] | None = None

    def load(self, num_labels: int | None, quantize: QuantizeConfig | None) -> tuple[nn.Module, Any]:
        """(model, tokenizer or None), its Linear layers quantized when `quantize` says so."""
        if quantize is None:
            return self.build(num_labels)
        if self.build_quantized is not None:
            return self.build_quantized(num_labels, quantize)
        from ..efficient.quantize import quantize as quantize_model

        model, processor = self.build(num_labels)
        skip = [quantize.skip] if isinstance(quantize.skip, str) else list(quantize.skip)
        quantize_model(model, config=quantize.model_copy(update={"skip": [*skip, *self.head]}))
        return model, processor


MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec(lambda n: bundled_models.load_minilm(num_labels=n), head=("classifier",),
                        build_quantized=lambda n, q: bundled_models.load_minilm(num_labels=n, quantize=q)),
    "smollm2": ModelSpec(lambda _: bundled_models.load_smollm2(),
                         build_quantized=lambda _, q: bundled_models.load_smollm2(quantize=q)),
    "efficientnet-lite0": ModelSpec(lambda n: (bundled_models.load_efficientnet_lite0(num_classes=n),
                                               bundled_models.EFFICIENTNET_LITE0_INPUT), head=("_fc",)),
    "vit-small": ModelSpec(lambda n: (bundled_models.load_vit_small(num_classes=n), bundled_models.VIT_SMALL_INPUT),
                           head=("classifier",)),
}


def register_model(name: str, build: ModelBuilder, head: tuple[str, ...] = ()) -> None:
    """Make `model.name: <name>` loadable: `build(num_labels)` returns (model, processor): a tokenizer, an
    `ImageInput` for classify-image, or None."""
    if name in MODELS and MODELS[name].build is not build:  # two builders under one name: one would be lost
        raise ValueError(f"a model named {name!r} is already registered (by {MODELS[name].build.__module__})")
    MODELS[name] = ModelSpec(build, tuple(head))


# --- data ----------------------------------------------------------------------------------------


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _label_folder(path: Path, text_column: str, label_column: str) -> Dataset:
    """A folder with one subfolder per label holding .txt files (one example per file)."""
    from datasets import ClassLabel, Dataset, Features, Value

    labels = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not labels:
        raise DataError(f"data folder {path} has no label subfolders (expected <label>/*.txt)")
    rows = [(f.read_text(encoding="utf-8").strip(), i) for i, label in enumerate(labels)
            for f in sorted((path / label).glob("*.txt"))]
    features = Features({text_column: Value("string"), label_column: ClassLabel(names=labels)})
    return Dataset.from_dict({text_column: [t for t, _ in rows], label_column: [y for _, y in rows]}, features)


def read_local(path: Path, text_column: str = "text", label_column: str = "label") -> Dataset:
    """A local JSONL / JSON / CSV file, or a folder of <label>/*.txt, as a `datasets.Dataset`."""
    bundled_models.require_extra("datasets", "train")
    from datasets import load_dataset

    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        dataset = _label_folder(path, text_column, label_column)
    else:
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl, .json, .csv or a folder")
        if path.stat().st_size == 0:
            raise DataError(f"data file {path} is empty")
        try:
            with _quiet_datasets():
                dataset = load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
        except Exception as err:  # datasets raises many types (even StopIteration) for unreadable files
            raise DataError(f"{path} is not a readable {builder.upper()} file: {type(err).__name__}: {err}") from None
    if len(dataset) == 0:
        raise DataError(f"data in {path} is empty: no examples")
    return dataset


def read_inputs(path: Path, column: str) -> list[str]:
    """The inputs `peftkit predict` reads: a .txt file (one per non-empty line), or the `column` of a
    .jsonl / .json / .csv file."""
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"input file {path} does not exist")
        inputs = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        dataset = read_local(path)
        _require_columns(dataset, [column], f"input file {path}")
        inputs = [str(value) for value in dataset[column]]
    if not inputs:
        raise DataError(f"input file {path} holds no inputs")
    return inputs


def _subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    return dataset if limit is None else dataset.shuffle(seed=seed).select(range(min(limit, len(dataset))))


def _require_columns(dataset: Dataset, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataError(f"{where} has no column {missing[0]!r}; columns: {', '.join(dataset.column_names)}")


def read_splits(data: DataSection, seed: int, bundled: Callable[[int], Any] | None) -> tuple[Dataset, Dataset | None]:
    """(train, eval) datasets from a bundled loader(seed) (for `data.name`) or local files, subset to the limits."""
    if data.name is not None:
        splits = bundled(seed)
        train, evaluation = splits["train"], splits["test"]
    else:
        train = read_local(data.train, data.text_column, data.label_column)
        evaluation = read_local(data.eval, data.text_column, data.label_column) if data.eval is not None else None
        if data.eval_fraction:
            if len(train) < 2:
                raise DataError(f"{data.train} has {len(train)} example: too few to split off an eval set")
            parts = train.train_test_split(test_size=data.eval_fraction, seed=seed)
            train, evaluation = parts["train"], parts["test"]
    train = _subset(train, data.train_limit, seed)
    return train, (_subset(evaluation, data.eval_limit, seed) if evaluation is not None else None)


def _label_ids(values: list[Any], names: list[str], where: str) -> list[int]:
    """Map label values (names or integer ids) onto `names`; anything outside the set is an error."""
    index = {name: i for i, name in enumerate(names)}
    ids, bad = [], []
    for row, value in enumerate(values):
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            ids.append(value)
        elif isinstance(value, str) and value in index:
            ids.append(index[value])
        else:
            bad.append((row, value))
    if bad:
        shown = ", ".join(f"row {r}: {v!r}" for r, v in bad[:5])
        raise DataError(f"{where}: {len(bad)} label(s) outside the declared set {names} ({shown})")
    return ids


def _class_names(train: Dataset, data: DataSection) -> list[str]:
    feature = train.features[data.label_column]
    if data.labels is not None:
        return list(data.labels)
    if hasattr(feature, "names"):  # a ClassLabel
        return list(feature.names)
    values = train[data.label_column]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    return sorted({str(v) for v in values})


# --- tasks ---------------------------------------------------------------------------------------


class Task(ABC):
    """One kind of training job. Subclasses set `name`, `metric`, `bundled` and the methods below."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the default best-checkpoint metric: "accuracy" (higher is better) or "loss"
    bundled: ClassVar[dict[str, Callable[[int], Any]]]  # data.name -> loader(seed)

    def check_bundled(self, data: DataSection) -> None:
        if data.name is not None and data.name not in self.bundled:
            raise DataError(f"task {self.name} has no bundled data set {data.name!r}; known: {', '.join(self.bundled)}")

    def read_table(self, data: DataSection, seed: int,
                   columns: list[str]) -> tuple[Dataset, Dataset | None, Dataset | None]:
        """Bundled or local (train, eval, test) datasets that have `columns` and are not empty."""
        self.check_bundled(data)
        train, evaluation = read_splits(data, seed, self.bundled.get(data.name))
        test = read_local(data.test, data.text_column, data.label_column) if data.test is not None else None
        for split, where in ((train, "train data"), (evaluation, "eval data"), (test, "test data")):
            if split is not None:
                _require_columns(split, columns, where)
                if len(split) == 0:
                    raise DataError(f"{where} is empty: no examples")
        return train, evaluation, test

    @abstractmethod
    def read_data(self, data: DataSection, seed: int) -> RawData:
        """Read and check the data (files exist, not empty, columns, labels) without loading a model."""

    def load_model(self, model: ModelSection, raw: RawData) -> tuple[nn.Module, Any]:
        """(model, processor) from the `MODELS` registry, sized for the data's labels."""
        return MODELS[model.name].load(len(raw.labels) if raw.labels is not None else None, model.quantize)

    def head_modules(self, model: ModelSection) -> list[str]:
        return list(MODELS[model.name].head)

    @abstractmethod
    def encode(self, raw: RawData, processor: Any, data: DataSection) -> TaskData:
        """Turn the checked data into `Rows`, once."""

    @staticmethod
    def encode_splits(raw: RawData, rows: Callable[[Any], Rows]) -> TaskData:
        """`rows(split)` for the train split and (if any) the eval and test splits."""
        def maybe(split: Any) -> Rows | None:
            return rows(split) if split is not None else None

        return TaskData(rows(raw.train), maybe(raw.eval), raw.labels, maybe(raw.test))

    def collate(self, rows: Rows, idx: torch.Tensor) -> Rows:
        """The batch of rows `idx`, ready for `row_stats` (text tasks cut the shared padding)."""
        batch = {key: value[idx] for key, value in rows.items()}
        if "attention_mask" in batch:
            length = int(batch["attention_mask"].sum(1).max())
            batch = {k: v[:, :length] if v.dim() == 2 else v for k, v in batch.items()}
        return batch

    def inputs(self, batch: Rows) -> ModelInputs:
        """What the model is called with for a batch: keyword tensors, or one positional tensor."""
        return {key: value for key, value in batch.items() if key != "labels"}

    @abstractmethod
    def loss_stats(self, logits: torch.Tensor, batch: Rows) -> RowStats:
        """Score the model's output for a batch per row (loss summed over each row's units)."""

    def row_stats(self, model: nn.Module, batch: Rows) -> RowStats:
        """Run the model on a batch and score it per row."""
        return self.loss_stats(model_logits(model, self.inputs(batch)), batch)

    predict_batch_size: ClassVar[int] = 32

    def input_column(self, data: DataSection) -> str:
        """The column of an input file that `peftkit predict` reads."""
        raise DataError(f"task {self.name} has no predict")

    def predict_inputs(self, path: Path, data: DataSection) -> list[str]:
        """What `peftkit predict` reads from `path`: texts (one per line of a .txt, or a column of a table)."""
        return read_inputs(path, self.input_column(data))

    def predict(self, model: nn.Module, processor: Any, inputs: list[str], data: DataSection,
                labels: list[str] | None, max_new_tokens: int) -> list[dict[str, Any]]:
        """One JSON-able record per input: what `peftkit predict` writes."""
        raise NotImplementedError


def _label_records(key: str, inputs: list[str], logits: torch.Tensor, labels: list[str]) -> list[dict[str, Any]]:
    """`peftkit predict`'s record per input: the most probable label, and every label's probability (softmax)."""
    probs = logits.float().softmax(-1).cpu()
    return [{key: item, "label": labels[int(row.argmax())],
             "probabilities": {name: round(float(p), 6) for name, p in zip(labels, row, strict=True)}}
            for item, row in zip(inputs, probs, strict=True)]


def _classification_stats(logits: torch.Tensor, labels: torch.Tensor) -> RowStats:
    logits = logits.float()
    return RowStats(F.cross_entropy(logits, labels, reduction="none"), torch.ones_like(labels, dtype=torch.float32),
                    logits.argmax(-1) == labels)


class ClassifyText(Task):
    """Sequence classification with an encoder (cross-entropy on the head's logits; accuracy)."""

    name = "classify-text"
    metric = "accuracy"
    bundled = {"bbc-news": lambda seed: bundled_sets.load_bbc_news(seed=seed)}

    def read_data(self, data: DataSection, seed: int) -> RawData:
        train, evaluation, test = self.read_table(data, seed, [data.text_column, data.label_column])
        names = _class_names(train, data)
        for split, where in ((train, "train data"), (evaluation, "eval data"), (test, "test data")):
            if split is not None:
                _label_ids(split[data.label_column], names, where)
        return RawData(train, evaluation, names, test)

    def encode(self, raw: RawData, processor: Any, data: DataSection) -> TaskData:
        def rows(split: Dataset) -> Rows:
            encoded = processor(list(split[data.text_column]), truncation=True, max_length=data.max_length,
                                padding="max_length", return_tensors="pt")
            labels = _label_ids(split[data.label_column], raw.labels, "data")
            return {**encoded, "labels": torch.tensor(labels)}

        return self.encode_splits(raw, rows)

    def loss_stats(self, logits: torch.Tensor, batch: Rows) -> RowStats:
        return _classification_stats(logits, batch["labels"])

    def input_column(self, data: DataSection) -> str:
        return data.text_column

    def label_logits(self, model: nn.Module, processor: Any, texts: list[str], data: DataSection,
                     labels: list[str]) -> torch.Tensor:
        """[texts, labels]: the classifier's logits for raw texts."""
        encoded = processor(texts, truncation=True, max_length=data.max_length, padding=True, return_tensors="pt")
        return model(**encoded.to(next(model.parameters()).device)).logits

    @torch.inference_mode()
    def predict(self, model: nn.Module, processor: Any, inputs: list[str], data: DataSection,
                labels: list[str] | None, max_new_tokens: int) -> list[dict[str, Any]]:
        """The most probable label of each text, with every label's probability (softmax of the logits)."""
        records = []
        for start in range(0, len(inputs), self.predict_batch_size):
            texts = inputs[start:start + self.predict_batch_size]
            records += _label_records("text", texts, self.label_logits(model, processor, texts, data, labels), labels)
        return records


class ClassifyTextPrompt(ClassifyText):
    """Text classification with a causal LM's own head, as MeZO's paper (and LM-BFF before it) trains: each text in a
    template, the label scored by its verbalizer word's logit at the next position, cross-entropy over the labels'
    words only (the paper's `train_as_classification`). No fresh head: the objective starts where pretraining left
    the model, which zeroth-order training needs (the paper finds MeZO without prompts far behind; here MiniLM with
    a fresh head barely moved in 160 MeZO steps).

        input = template(text) = "{text}\\nTopic:";  logits_c = LM(input)[last position, first token of " " + label_c]

    Rows are left-padded, so the last position is every row's next token (sequence deltas put their virtual tokens
    before the text, as for any causal model); a text is cut to fit `data.max_length` with the template's end kept."""

    name = "classify-text-prompt"
    template = "{text}\nTopic:"
    verbalizer: list[int]  # the labels' word token ids, set by `encode`

    def load_model(self, model: ModelSection, raw: RawData) -> tuple[nn.Module, Any]:
        loaded, processor = MODELS[model.name].load(None, model.quantize)  # the LM itself, with its own head
        if not hasattr(loaded, "get_output_embeddings") or loaded.get_output_embeddings() is None:
            raise DataError(f"task {self.name} scores label words with a language model's head; model {model.name} "
                            "has none (use a causal LM such as smollm2)")
        return loaded, processor

    def head_modules(self, model: ModelSection) -> list[str]:
        return []

    def encode(self, raw: RawData, processor: Any, data: DataSection) -> TaskData:
        self.verbalizer = label_words(processor, raw.labels)

        def rows(split: Dataset) -> Rows:
            encoded = prompt_rows(processor, self.template, list(split[data.text_column]), data.max_length)
            return {**encoded, "labels": torch.tensor(_label_ids(split[data.label_column], raw.labels, "data"))}

        return self.encode_splits(raw, rows)

    def collate(self, rows: Rows, idx: torch.Tensor) -> Rows:
        """The batch of rows `idx`, its shared left padding cut."""
        batch = {key: value[idx] for key, value in rows.items()}
        length = int(batch["attention_mask"].sum(1).max())
        return {k: v[:, -length:] if v.dim() == 2 else v for k, v in batch.items()}

    def loss_stats(self, logits: torch.Tensor, batch: Rows) -> RowStats:
        return _classification_stats(logits[:, -1, self.verbalizer], batch["labels"])

    def label_logits(self, model: nn.Module, processor: Any, texts: list[str], data: DataSection,
                     labels: list[str]) -> torch.Tensor:
        encoded = self.collate(prompt_rows(processor, self.template, texts, data.max_length), torch.arange(len(texts)))
        device = next(model.parameters()).device
        logits = model(**{key: value.to(device) for key, value in encoded.items()}).logits
        return logits[:, -1, label_words(processor, labels)]


def label_words(tokenizer: Any, labels: list[str]) -> list[int]:
    """Each label's verbalizer token: the first token of " " + its name; two labels may not share one."""
    words = [tokenizer(f" {label}", add_special_tokens=False)["input_ids"][0] for label in labels]
    shared = [label for label, word in zip(labels, words) if words.count(word) > 1]
    if shared:
        raise DataError(f"labels {shared} begin with the same token, so their verbalizer words cannot tell them apart")
    return words


def prompt_rows(tokenizer: Any, template: str, texts: list[str], max_length: int) -> Rows:
    """Each text in `template` ("...{text}..."), tokenized, the text cut so the whole fits `max_length` tokens with
    the template's end kept, left-padded to `max_length`."""
    head, tail = template.split("{text}")
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if len(tail_ids) >= max_length:
        raise DataError(f"the template's end {tail!r} fills all of data.max_length={max_length} tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(texts), max_length), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, text in enumerate(texts):
        ids = tokenizer(head + text, add_special_tokens=False)["input_ids"][:max_length - len(tail_ids)] + tail_ids
        input_ids[row, max_length - len(ids):] = torch.tensor(ids)
        attention[row, max_length - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


def chat_rows(tokenizer: Any, prompts: list[str], responses: list[str], max_length: int) -> Rows:
    """Chat-template each (prompt, response) pair; labels are -100 on the prompt (system and user turns plus
    the assistant header) and on padding, so the loss covers only the answer and its end-of-turn tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(prompts), max_length), pad, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention = torch.zeros_like(input_ids)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(head):
            raise DataError(f"the chat template does not render the prompt as a prefix of the conversation (row {row})")
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        ids = (head_ids + tokenizer(full[len(head):], add_special_tokens=False)["input_ids"])[:max_length]
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
        labels[row, len(head_ids):len(ids)] = input_ids[row, len(head_ids):len(ids)]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class CausalLMChat(Task):
    """Instruction tuning of a causal LM: next-token cross-entropy on the answer tokens only."""

    name = "causal-lm-chat"
    metric = "loss"
    bundled = {"chatterbot": lambda seed: bundled_sets.load_chatterbot_splits(seed=seed)}

    def read_data(self, data: DataSection, seed: int) -> RawData:
        train, evaluation, test = self.read_table(data, seed, [data.prompt_column, data.response_column])
        return RawData(train, evaluation, None, test)

    def encode(self, raw: RawData, processor: Any, data: DataSection) -> TaskData:
        if not getattr(processor, "chat_template", None):
            raise DataError("task causal-lm-chat needs a tokenizer with a chat template")

        def rows(split: Dataset) -> Rows:
            encoded = chat_rows(processor, list(split[data.prompt_column]), list(split[data.response_column]),
                                data.max_length)
            no_answer = int((~(encoded["labels"] != -100).any(1)).sum())
            if no_answer:
                raise DataError(f"{no_answer} of {len(split)} prompts fill all of data.max_length={data.max_length} "
                                "tokens, leaving no answer to learn: raise data.max_length")
            return encoded

        return self.encode_splits(raw, rows)

    def inputs(self, batch: Rows) -> ModelInputs:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def loss_stats(self, logits: torch.Tensor, batch: Rows) -> RowStats:
        """Units: the answer tokens that are predicted (every labelled token after the first position)."""
        # sequence deltas (prompt, P-tuning) put virtual tokens first: the real tokens are the last positions
        logits = logits[:, -batch["input_ids"].size(1):]
        targets = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
        return RowStats(losses.sum(1), (targets != -100).sum(1).float())

    def input_column(self, data: DataSection) -> str:
        return data.prompt_column

    @torch.inference_mode()
    def predict(self, model: nn.Module, processor: Any, inputs: list[str], data: DataSection,
                labels: list[str] | None, max_new_tokens: int) -> list[dict[str, Any]]:
        """The greedy answer to each prompt, rendered with the chat template as in training."""
        device, records = next(model.parameters()).device, []
        for prompt in inputs:
            text = processor.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
            ids = processor(text, add_special_tokens=False, return_tensors="pt").to(device)
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=processor.pad_token_id or processor.eos_token_id)
            answer = processor.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            records.append({"prompt": prompt, "response": answer.strip()})
        return records


class ClassifyImage(Task):
    """Image classification (cross-entropy on the model's logits; accuracy) on the bundled Fashion-MNIST or on image
    folders in torchvision's `ImageFolder` layout: `data.train` (and `data.eval`, `data.test`) hold `<label>/<image>`,
    the labels are the sorted folder names (or `data.labels`). Folder images are read once, centre-cropped and resized
    to `data.image_size`; Fashion-MNIST's 28-pixel greyscale ones are resized and repeated to 3 channels per batch.
    Pixels are normalised as the model's `ImageInput` (the builder's second value) says."""

    name = "classify-image"
    metric = "accuracy"
    bundled = {"fashion-mnist": lambda seed: None}  # read by `read_data` (tensors, not a Dataset)

    def __init__(self) -> None:
        self.image_size = 224  # data.image_size, set with the model's normalisation by `use_model`
        self.image_input: bundled_models.ImageInput | None = None

    def read_data(self, data: DataSection, seed: int) -> RawData:
        self.check_bundled(data)
        if data.name is None:
            return self._read_folders(data, seed)
        if data.test is not None:
            raise DataError("fashion-mnist brings its own test split (scored as eval): drop data.test "
                            "(it names an image folder)")
        def split(name: str, limit: int | None) -> Rows:
            images, labels = bundled_sets.load_fashion_mnist(name)
            keep = _shuffled(len(labels), seed)[:limit]
            return {"pixels": images[keep], "labels": labels[keep]}

        return RawData(split("train", data.train_limit), split("test", data.eval_limit), list(bundled_sets.FASHION_MNIST_CLASSES))

    def _read_folders(self, data: DataSection, seed: int) -> RawData:
        """Train, eval (a folder, or data.eval_fraction of train) and test image folders, subset to the limits."""
        paths, labels, names = _image_folder(data.train, data.labels, "train data", "data.labels")
        known = "data.labels" if data.labels is not None else "the train data"

        def rows(split_paths: list[Path], split_labels: torch.Tensor, keep: torch.Tensor, where: str) -> Rows:
            return {"pixels": _load_images([split_paths[i] for i in keep.tolist()], data.image_size, where),
                    "labels": split_labels[keep]}

        train, evaluation = _shuffled(len(paths), seed), None
        if data.eval_fraction:
            if len(paths) < 2:
                raise DataError(f"{data.train} has {len(paths)} image: too few to split off an eval set")
            cut = min(max(1, round(len(paths) * data.eval_fraction)), len(paths) - 1)
            evaluation = rows(paths, labels, train[:cut][:data.eval_limit], "eval data")
            train = train[cut:]
        elif data.eval is not None:
            eval_paths, eval_labels, _ = _image_folder(data.eval, names, "eval data", known)
            evaluation = rows(eval_paths, eval_labels, _shuffled(len(eval_paths), seed)[:data.eval_limit], "eval data")
        test = None
        if data.test is not None:
            test_paths, test_labels, _ = _image_folder(data.test, names, "test data", known)
            test = rows(test_paths, test_labels, torch.arange(len(test_paths)), "test data")
        return RawData(rows(paths, labels, train[:data.train_limit], "train data"), evaluation, names, test)

    def use_model(self, processor: Any, data: DataSection) -> None:
        """Take the model's normalisation (its `ImageInput`) and data.image_size, checked against its patch size."""
        if not isinstance(processor, bundled_models.ImageInput):
            raise DataError("task classify-image needs a model that says how it reads pixels: its builder returns "
                            f"(model, peftkit.models.ImageInput(mean, std)), here (model, {type(processor).__name__})")
        if data.image_size % processor.patch:
            raise DataError(f"data.image_size {data.image_size} is not a multiple of the model's patch size "
                            f"{processor.patch}: its patches would drop the images' last rows and columns")
        self.image_size, self.image_input = data.image_size, processor

    def encode(self, raw: RawData, processor: Any, data: DataSection) -> TaskData:
        self.use_model(processor, data)
        return TaskData(raw.train, raw.eval, raw.labels, raw.test)

    def model_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the model's input [B, 3, S, S]: greyscale [B, H, W] repeated to 3 channels, another side
        than S resized (bilinear), then normalised. Done per batch, so the rows stay small uint8 tensors."""
        pixels = images.float().div(255)
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(1)
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(pixels, size=self.image_size, mode="bilinear", align_corners=False)
        return self.image_input.normalize(pixels.expand(-1, 3, -1, -1))

    def collate(self, rows: Rows, idx: torch.Tensor) -> Rows:
        return {"pixels": self.model_pixels(rows["pixels"][idx]), "labels": rows["labels"][idx]}

    def inputs(self, batch: Rows) -> ModelInputs:
        return batch["pixels"]

    def loss_stats(self, logits: torch.Tensor, batch: Rows) -> RowStats:
        return _classification_stats(logits, batch["labels"])

    def predict_inputs(self, path: Path, data: DataSection) -> list[str]:
        """An image file, a folder of images (searched recursively), or a .txt file of image paths, one per line
        (relative to the .txt file's folder)."""
        if path.is_dir():
            try:
                return [str(p) for p in bundled_sets.image_files(path)]
            except ValueError as err:
                raise DataError(str(err)) from None
        if path.suffix.lower() in bundled_sets.IMAGE_SUFFIXES:
            images = [path]
        elif path.suffix.lower() == ".txt":
            images = [path.parent / line for line in read_inputs(path, column="")]  # a .txt has no columns
        else:
            raise DataError(f"{path}: task classify-image predicts on an image file, a folder of images or a .txt "
                            "file listing image paths")
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise DataError(f"image file {missing[0]} does not exist" + (f" ({len(missing) - 1} more missing)"
                                                                         if len(missing) > 1 else ""))
        return [str(p) for p in images]

    @torch.inference_mode()
    def predict(self, model: nn.Module, processor: Any, inputs: list[str], data: DataSection,
                labels: list[str] | None, max_new_tokens: int) -> list[dict[str, Any]]:
        """The most probable label of each image, with every label's probability (softmax of the logits)."""
        self.use_model(processor, data)
        device, records = next(model.parameters()).device, []
        for start in range(0, len(inputs), self.predict_batch_size):
            paths = inputs[start:start + self.predict_batch_size]
            pixels = self.model_pixels(_load_images([Path(p) for p in paths], self.image_size, "input"))
            records += _label_records("image", paths, model_logits(model, pixels.to(device)), labels)
        return records


def _shuffled(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _image_folder(path: Path, names: list[str] | None, where: str,
                  known: str) -> tuple[list[Path], torch.Tensor, list[str]]:
    """(image files, label ids, label names) of an image folder; with `names` (those `known` gives: data.labels, or
    the train data's) its label folders must be among them and the ids index them."""
    try:
        paths, ids, found = bundled_sets.list_image_folder(path)
    except (ValueError, FileNotFoundError) as err:
        raise DataError(f"{where}: {err}") from None
    if names is None:
        return paths, torch.tensor(ids), found
    outside = [label for label in found if label not in names]
    if outside:
        raise DataError(f"{where} {path} has label folder(s) {outside} missing from {known} "
                        f"(labels: {', '.join(names)})")
    index = [names.index(label) for label in found]
    return paths, torch.tensor([index[i] for i in ids]), list(names)


def _load_images(paths: list[Path], size: int, where: str) -> torch.Tensor:
    try:
        return bundled_sets.load_images(paths, size)
    except (ValueError, FileNotFoundError) as err:
        raise DataError(f"{where}: {err}") from None


TASKS: dict[str, type[Task]] = {task.name: task for task in (ClassifyText, ClassifyTextPrompt, CausalLMChat,
                                                             ClassifyImage)}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `task: <cls.name>` usable in training configs."""
    TASKS[cls.name] = cls
    return cls
