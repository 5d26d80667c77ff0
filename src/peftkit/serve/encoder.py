"""Sentence embeddings and text classification for many callers and adapters: one worker thread batches concurrent
`embed` and `classify` calls and runs each batch as one forward pass with every row routed to its own adapter.

Pooling is sentence-transformers' for all-MiniLM-L6-v2: the mean of the last hidden states over the attention mask,
then L2 normalisation,  e = normalize(Σ_t m_t h_t / Σ_t m_t).
Classification is `BertForSequenceClassification`'s in eval mode, with the head the adapter was trained with:
p = softmax(W · tanh(W_pool h_[CLS] + b_pool) + b); the rows of each adapter go through that adapter's head.
"""
from __future__ import annotations

import queue
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..api import adapters, routed
from ..core.config import AdapterConfig
from ..core.hf_peft import COPY_KEY
from ..core.io import AdapterFileError, read_adapter
from ..core.registry import get_registry
from .requests import AdapterUnavailable, QueueFull, ServeError, UnknownAdapter
from .store import AdapterStore

LOAD_POLL_S = 0.05  # how long the worker sleeps on adapter reads before looking at new calls again
HEAD_MODULE = "classifier"  # BertForSequenceClassification's head: `peftkit train` saves it as a head copy
ENCODER_PREFIX = "bert."  # its encoder's module names; the served BertModel's are the same without the prefix
RUN_CONFIG = "config.yaml"  # what `peftkit train` writes beside OUTPUT/adapter: the run's data give the label names
Kind = Literal["embed", "classify"]  # what a call asks for


class NoClassifierHead(ServeError):
    """Classification asked of the base, or of an adapter saved without a classifier head."""

    code = "no_classifier_head"


@dataclass(frozen=True)
class Head:
    """A sequence classifier's head and its label names, one per class: p = softmax(W x + b)."""

    weight: torch.Tensor  # [classes, hidden]
    bias: torch.Tensor  # [classes]
    labels: tuple[str, ...]
    max_length: int | None = None  # tokens per text in training (None: the engine's own limit)

    def probabilities(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.linear(pooled, self.weight.to(pooled), self.bias.to(pooled)).float().softmax(-1)


@dataclass(frozen=True)
class Classification:
    """One text's most probable label, and every label's probability in the head's class order."""

    label: str
    probs: dict[str, float]
    tokens: int  # of the text as the encoder read it (truncated to the head's length)


@dataclass(eq=False)
class _Call:
    """One `embed` or `classify` call: its texts, adapter, and the results filled in as its rows run."""

    texts: list[str]
    adapter: str | None
    kind: Kind = "embed"
    result: Future = field(default_factory=Future)
    done: int = 0

    def __post_init__(self) -> None:
        self.outputs: list[list[float] | Classification | None] = [None] * len(self.texts)


class EncoderEngine:
    """Batched, per-row-adapter embeddings and classifications from an encoder (a `BertModel`:
    `peftkit.models.load_minilm()`); classification adapters need a store that reads with `read_encoder_adapter`."""

    def __init__(self, model: nn.Module, tokenizer, store: AdapterStore | None = None, max_batch: int = 64,
                 name: str = "minilm", *, max_length: int = 256, max_queue: int = 256):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if store is not None and store.model is not model:
            raise ValueError("the adapter store belongs to another model")
        self.model, self.tokenizer, self.store = model.eval(), tokenizer, store
        self.max_batch, self.name = max_batch, name
        self.max_length = max_length  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
        self._calls: queue.Queue[_Call] = queue.Queue(maxsize=max_queue)
        self._rows: deque[tuple[_Call, int]] = deque()  # taken from the queue, not run yet
        self._running = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the encoder engine is already running")
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-encoder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker; calls not finished fail with a ServeError."""
        self._running.clear()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        stopped = ServeError("the encoder engine stopped")
        while not self._calls.empty():
            self._calls.get_nowait().result.set_exception(stopped)
        for call in {call for call, _ in self._rows}:
            call.result.set_exception(stopped)
        self._rows.clear()

    def embed(self, texts: list[str], adapter: str | None = None) -> list[list[float]]:
        """Unit-length embeddings of `texts` with `adapter` (None: the base); blocks until they are computed."""
        return self._submit(texts, adapter, "embed")

    def classify(self, texts: list[str], adapter: str) -> list[Classification]:
        """Each text's label and probabilities from `adapter`'s classifier head; blocks until they are computed.
        The base has no head; an adapter has one when it was saved from a sequence classifier (`peftkit train`,
        task classify-text) and its store reads with `read_encoder_adapter`."""
        if adapter is None:
            raise NoClassifierHead(f"the base model {self.name!r} has no classifier head: name a classification "
                                   "adapter (one trained with task classify-text) as the model")
        return self._submit(texts, adapter, "classify")

    def _submit(self, texts: list[str], adapter: str | None, kind: Kind) -> list:
        if self._thread is None:
            raise RuntimeError("the encoder engine is not running: call start() first")
        if adapter is not None:
            if self.store is None:
                raise UnknownAdapter(f"the adapter {adapter!r} does not exist (this engine serves the base only)")
            self.store.check(adapter)
        if not texts:
            return []
        call = _Call(list(texts), adapter, kind)
        try:
            self._calls.put_nowait(call)
        except queue.Full:
            raise QueueFull(f"the encoder queue is full ({self._calls.maxsize} calls waiting); retry later") from None
        return call.result.result()

    # --- the worker thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while self._running.is_set():
            try:
                self._step()
            except Exception as err:  # the store failed (removing an adapter): fail the waiting calls, keep serving
                for call, _ in self._rows:
                    if not call.result.done():
                        call.result.set_exception(err)
                self._rows.clear()

    def _step(self) -> None:
        self._take_calls(block=not self._rows)
        batch = self._ready_rows()
        if batch:
            self._run(batch)
        elif self._rows:  # every waiting row's adapter is still being read
            self.store.wait_reads({call.adapter for call, _ in self._rows}, timeout=LOAD_POLL_S)

    def _take_calls(self, block: bool) -> None:
        try:
            call = self._calls.get(timeout=LOAD_POLL_S) if block else self._calls.get_nowait()
            while True:
                self._rows.extend((call, i) for i in range(len(call.texts)))
                call = self._calls.get_nowait()
        except queue.Empty:
            return

    def _ready_rows(self) -> list[tuple[_Call, int]]:
        """Up to max_batch waiting rows, oldest first, whose adapters are on the model; rows of adapters that failed
        or were unregistered fail their calls; rows of adapters still loading wait."""
        if self.store is not None and self._rows:
            self.store.prepare({call.adapter for call, _ in self._rows} - {None}, set())
        batch, waiting = [], deque()
        for call, row in self._rows:
            if call.result.done():
                continue
            state = self._state(call)
            if state == "ready" and len(batch) < self.max_batch:
                batch.append((call, row))
            elif state != "failed":
                waiting.append((call, row))
        self._rows = waiting
        return batch

    def _state(self, call: _Call) -> str:
        if call.adapter is None:
            return "ready"
        try:
            state = self.store.state(call.adapter)
            if state == "failed":
                raise AdapterUnavailable(self.store.failure(call.adapter))
            if state == "ready" and call.kind == "classify" and head_of(self.model, call.adapter) is None:
                raise NoClassifierHead(f"adapter {call.adapter!r} has no classifier head (it was not saved from a "
                                       "sequence classifier with its head, e.g. by `peftkit train` with task "
                                       "classify-text): it serves embeddings only")
        except ServeError as err:
            call.result.set_exception(err)
            return "failed"
        return state

    def _run(self, batch: list[tuple[_Call, int]]) -> None:
        try:
            outputs = self._outputs(batch)
        except Exception as err:  # a failing batch fails its calls, never the worker
            for call in {call for call, _ in batch}:
                if not call.result.done():
                    call.result.set_exception(err)
            return
        for (call, row), output in zip(batch, outputs):
            call.outputs[row] = output
            call.done += 1
            if call.done == len(call.texts) and not call.result.done():
                call.result.set_result(call.outputs)

    def _outputs(self, batch: list[tuple[_Call, int]]) -> list[list[float] | Classification]:
        """One forward pass for the whole batch; embeddings pooled from it, classifications through each adapter's
        head for that adapter's rows (each text cut to the length its head was trained on)."""
        heads = {call.adapter: head_of(self.model, call.adapter) for call, _ in batch if call.kind == "classify"}
        limits = [(heads[call.adapter].max_length if call.kind == "classify" else None) or self.max_length
                  for call, _ in batch]
        hidden, pooled, mask = self._encode_rows([call.texts[row] for call, row in batch],
                                                 [call.adapter for call, _ in batch], limits)
        outputs: list[list[float] | Classification | None] = [None] * len(batch)
        embedding = [i for i, (call, _) in enumerate(batch) if call.kind == "embed"]
        if embedding:
            for i, vector in zip(embedding, mean_pooled(hidden[embedding], mask[embedding]).tolist()):
                outputs[i] = vector
        if heads and pooled is None:
            raise ServeError(f"the encoder {self.name!r} has no pooler, which a sequence classifier's head reads")
        tokens = mask.sum(1).tolist()
        for adapter, head in heads.items():
            rows = [i for i, (call, _) in enumerate(batch) if call.kind == "classify" and call.adapter == adapter]
            probs = head.probabilities(pooled[rows])
            for i, row, best in zip(rows, probs.tolist(), probs.argmax(-1).tolist()):
                outputs[i] = Classification(head.labels[best], dict(zip(head.labels, row, strict=True)), tokens[i])
        return outputs

    @torch.inference_mode()
    def _encode_rows(self, texts: list[str], row_adapters: list[str | None],
                     limits: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(last hidden states, pooler output, attention mask) of `texts`, row i cut to `limits[i]` tokens and run
        through `row_adapters[i]`."""
        ids: list[list[int]] = [[] for _ in texts]
        for limit in set(limits):
            rows = [i for i, row_limit in enumerate(limits) if row_limit == limit]
            cut = self.tokenizer([texts[i] for i in rows], truncation=True, max_length=limit)["input_ids"]
            for i, row_ids in zip(rows, cut):
                ids[i] = row_ids
        device = next(self.model.parameters()).device
        inputs = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
        if adapters(self.model):
            with routed(self.model, row_adapters):
                out = self.model(**inputs)
        else:
            out = self.model(**inputs)
        return out.last_hidden_state, out.pooler_output, inputs["attention_mask"]


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """normalize(Σ_t m_t h_t / Σ_t m_t) per row (sentence-transformers' Pooling(mean) + Normalize)."""
    if hidden.shape[1] != mask.shape[1]:
        raise ServeError(f"the encoder returned {hidden.shape[1]} positions for {mask.shape[1]} tokens; adapters that "
                         "add positions (prompt tuning) cannot be pooled into embeddings")
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(summed.float(), p=2, dim=1)


# --- classifier adapters: read for the served encoder, heads kept beside them ---------------------------------------
_HEADS: dict[int, Head] = {}  # id(config of a read adapter) -> its head, for as long as that config object lives


def read_encoder_adapter(directory: Path, model: nn.Module,
                         root: Path | None = None) -> tuple[AdapterConfig, dict[str, torch.Tensor], str | None]:
    """The adapter store's reader on an encoder server (`AdapterStore(model, reader=read_encoder_adapter)`):
    `read_adapter`, with an adapter saved from MiniLM as a sequence classifier made to fit the served `BertModel`:
    its module names lose their `bert.` prefix and its head copy (`classifier`) is split off into a `Head`, found
    by `head_of(model, name)` once the store has attached the adapter under `name`.

    Label names and the text length come from the training run's config beside the directory (OUTPUT/config.yaml
    beside OUTPUT/adapter): see `_run_labels`. With an adapter `root` (`--adapter-root`), a run config outside it is
    not read (`functools.partial(read_encoder_adapter, root=...)` as the store's reader)."""
    config, tensors, name = read_adapter(directory, model)
    tensors = {key.removeprefix(ENCODER_PREFIX): value for key, value in tensors.items()}
    copied = f"{HEAD_MODULE}{COPY_KEY}"
    has_head = HEAD_MODULE in config.modules_to_save
    head = {key[len(copied):]: tensors.pop(key) for key in [k for k in tensors if has_head and k.startswith(copied)]}
    if has_head and set(head) != {"weight", "bias"}:
        raise AdapterFileError(f"{directory}: the head copy {HEAD_MODULE!r} needs the tensors {copied}weight and "
                               f"{copied}bias; the file has {sorted(copied + key for key in head) or 'neither'}")
    config = config.model_copy(update={
        "targets": _unprefixed(config.targets), "exclude": _unprefixed(config.exclude),
        "modules_to_save": [module for module in _unprefixed(config.modules_to_save) if module != HEAD_MODULE]})
    if has_head:
        _HEADS[id(config)] = Head(head["weight"], head["bias"], *_run_labels(directory, head["weight"].shape[0], root))
        weakref.finalize(config, _HEADS.pop, id(config), None)
    return config, tensors, name


def head_of(model: nn.Module, name: str) -> Head | None:
    """The classifier head of adapter `name` attached to `model` by a store reading with `read_encoder_adapter`."""
    return _HEADS.get(id(get_registry(model).configs.get(name)))


def _unprefixed(spec: str | list[str] | None) -> str | list[str] | None:
    """Module names of a list spec as the served BertModel names them (a regex is left as written)."""
    return [entry.removeprefix(ENCODER_PREFIX) for entry in spec] if isinstance(spec, list) else spec


def _run_labels(directory: Path, classes: int, root: Path | None) -> tuple[tuple[str, ...], int | None]:
    """(label names, tokens per text) of the run that trained the adapter in `directory`, from its config beside it:
    the declared `data.labels`, or a bundled set's classes (as `peftkit predict` names them). Local training files
    are never read here (a served directory must not make the server read other files): without declared labels,
    or without a run config (or with one outside the adapter `root`), the names are LABEL_0, LABEL_1, ...
    (transformers' default)."""
    numbered = tuple(f"LABEL_{i}" for i in range(classes))
    config_file = directory.parent / RUN_CONFIG
    outside = root is not None and not config_file.resolve().is_relative_to(Path(root).resolve())
    if outside or not config_file.is_file():
        return numbered, None
    from ..train import load_config  # the training stack only for adapters trained by `peftkit train`
    from ..train.tasks import TASKS

    try:
        config = load_config(config_file)
        data = config.data
        bundled = data.model_copy(update={"test": None})  # its own splits only, never a local test file
        labels = data.labels or (TASKS[config.task]().read_data(bundled, config.seed).labels if data.name else numbered)
    except ValueError as err:  # TrainConfigError and DataError are ValueErrors
        raise AdapterFileError(f"{config_file} (the run config beside the adapter, read for its label names): "
                               f"{err}") from None
    if labels is None or len(labels) != classes:
        raise AdapterFileError(f"{config_file} gives {len(labels or [])} label names (task {config.task}), but the "
                               f"adapter's head has {classes} classes")
    return tuple(labels), data.max_length
