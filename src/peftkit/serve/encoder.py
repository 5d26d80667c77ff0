"""Sentence embeddings for many callers and adapters: one worker thread batches concurrent `embed` calls and runs each
batch as one forward pass with every row routed to its own adapter.

Pooling is sentence-transformers' for all-MiniLM-L6-v2: the mean of the last hidden states over the attention mask,
then L2 normalisation,  e = normalize(Σ_t m_t h_t / Σ_t m_t).
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..api import adapters, routed
from .requests import AdapterUnavailable, QueueFull, ServeError, UnknownAdapter
from .store import AdapterStore

LOAD_POLL_S = 0.05  # how long the worker sleeps on adapter reads before looking at new calls again


@dataclass(eq=False)
class _Call:
    """One `embed` call: its texts, adapter, and the embeddings filled in as its rows run."""

    texts: list[str]
    adapter: str | None
    result: Future = field(default_factory=Future)
    done: int = 0

    def __post_init__(self) -> None:
        self.vectors: list[list[float] | None] = [None] * len(self.texts)


class EncoderEngine:
    """Batched, per-row-adapter embeddings from an encoder (a `BertModel`: `peftkit.models.load_minilm()`)."""

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
        if self._thread is None:
            raise RuntimeError("the encoder engine is not running: call start() first")
        if adapter is not None:
            if self.store is None:
                raise UnknownAdapter(f"the adapter {adapter!r} does not exist (this engine serves the base only)")
            self.store.check(adapter)
        if not texts:
            return []
        call = _Call(list(texts), adapter)
        try:
            self._calls.put_nowait(call)
        except queue.Full:
            raise QueueFull(f"the embedding queue is full ({self._calls.maxsize} calls waiting); retry later") from None
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
        except ServeError as err:
            call.result.set_exception(err)
            return "failed"
        return state

    def _run(self, batch: list[tuple[_Call, int]]) -> None:
        try:
            vectors = self._embed_rows([call.texts[row] for call, row in batch], [call.adapter for call, _ in batch])
        except Exception as err:  # a failing batch fails its calls, never the worker
            for call in {call for call, _ in batch}:
                if not call.result.done():
                    call.result.set_exception(err)
            return
        for (call, row), vector in zip(batch, vectors.tolist()):
            call.vectors[row] = vector
            call.done += 1
            if call.done == len(call.texts) and not call.result.done():
                call.result.set_result(call.vectors)

    @torch.inference_mode()
    def _embed_rows(self, texts: list[str], row_adapters: list[str | None]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        inputs = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        if adapters(self.model):
            with routed(self.model, row_adapters):
                hidden = self.model(**inputs).last_hidden_state
        else:
            hidden = self.model(**inputs).last_hidden_state
        return mean_pooled(hidden, inputs["attention_mask"])


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """normalize(Σ_t m_t h_t / Σ_t m_t) per row (sentence-transformers' Pooling(mean) + Normalize)."""
    if hidden.shape[1] != mask.shape[1]:
        raise ServeError(f"the encoder returned {hidden.shape[1]} positions for {mask.shape[1]} tokens; adapters that "
                         "add positions (prompt tuning) cannot be pooled into embeddings")
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(summed.float(), p=2, dim=1)
