"""The serving engine for decoder models: many requests, each with its own adapter, in one running batch.

One scheduler thread owns the model. Each iteration it
1. takes new and cancelled requests, and lets the adapter store load, attach and evict adapters (only here, between
   forward passes);
2. prefills newcomers within a token budget (`prefill_budget` prompt tokens per iteration, a long prompt in chunks
   over several iterations), so the running streams keep flowing while new requests arrive;
3. runs one decode forward over every running request, each row routed to its own adapter (any method, any rank,
   `peftkit.routed`), samples each row's next token with the row's own parameters and generator, and streams text;
   finished rows leave at once and their cache rows are reused (iteration-level, "continuous" batching).

Keys and values stay in `SlotKVCache` (one preallocated row per running request, written in place). Prompt and
prefix adapters are applied here rather than by `core.sequence`'s call rewrite: a prefix's keys and values are
written into the row's first positions once, a prompt's virtual tokens are embedded in front of the row's first
prefill chunk; real tokens then take positions after the virtual ones, as in `core.sequence`.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import routed
from ..core.delta import Placement
from ..core.registry import REGISTRY_ATTR
from ..core.sequence import SequenceDelta, cache_argument, input_embeddings, kv_geometry
from ..core.slot import deltas_of
from .kv import SlotKVCache
from .requests import (AdapterUnavailable, ContextTooLong, EngineStopped, FinishEvent, FinishReason, GenerationRequest, QueueFull,
                       SamplingParams, ServeError, TokenEvent, UnknownAdapter)
from .sampling import TextStream, generator_for, next_token

Event = TokenEvent | FinishEvent
IDLE_TICK = 0.5  # seconds an idle engine sleeps between looks at the store (an unregistered adapter leaves)


class RequestHandle:
    """A submitted request's event stream: iterate it (blocking) or `async for` over `stream()`; `cancel()` when the
    client has gone away (its row and cache are freed at the next iteration)."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.cancelled = False
        self.submitted = time.perf_counter()
        self._events: deque[Event] = deque()
        self._ready = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Event] | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def deliver(self, event: Event) -> None:
        """Called by the engine thread."""
        with self._ready:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
            else:
                self._events.append(event)
                self._ready.notify()

    def __iter__(self) -> Iterator[Event]:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._events)
                event = self._events.popleft()
            yield event
            if isinstance(event, FinishEvent):
                return

    async def stream(self) -> AsyncIterator[Event]:
        with self._ready:  # events delivered before this call are handed over first
            self._loop, self._queue = asyncio.get_running_loop(), asyncio.Queue()
            while self._events:
                self._queue.put_nowait(self._events.popleft())
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return


@dataclass
class _Running:
    """A request that holds a cache row: prefilling (`pending` inputs left) or decoding."""

    handle: RequestHandle
    text: TextStream
    generator: torch.Generator | None
    pending: list[int]  # prompt tokens not yet prefilled
    virtual: torch.Tensor | None = None  # a prompt adapter's virtual token embeddings, before the first chunk
    length: int = 0  # positions filled in the cache row
    output: list[int] = field(default_factory=list)
    last_token: int | None = None
    last_emit: float | None = None

    @property
    def adapter(self) -> str | None:
        return self.handle.request.adapter

    @property
    def params(self) -> SamplingParams:
        return self.handle.request.params


class Engine:
    """Continuous batching over one decoder model and an adapter store (module docstring; docs/serving.md)."""

    def __init__(self, model: nn.Module, tokenizer: Any, store: Any = None, *, max_batch: int = 64,
                 prefill_budget: int = 256, max_queue: int = 256, max_context: int | None = None,
                 metrics: Any = None, name: str = "base"):
        self.model, self.tokenizer, self.store, self.metrics, self.name = model.eval(), tokenizer, store, metrics, name
        self.max_batch, self.prefill_budget, self.max_queue = max_batch, prefill_budget, max_queue
        config = model.config
        self.max_context = max_context or config.max_position_embeddings
        layers, heads, head_dim = kv_geometry(model)
        parameter = next(model.parameters())
        self.cache = SlotKVCache(layers, heads, head_dim, max_batch, self.max_context, parameter.dtype,
                                 parameter.device)
        self.device = parameter.device
        self.eos = _eos_ids(model, tokenizer)
        self._cache_arg = cache_argument(model)
        # sdpa takes a boolean mask (True: attend); the eager attention adds a float mask to its scores
        self._bool_mask = getattr(config, "_attn_implementation", "sdpa") != "eager"
        self._submitted: deque[RequestHandle] = deque()
        self._waiting: deque[RequestHandle] = deque()
        self._rows: list[_Running] = []  # index = cache row; decoding rows first, then at most one prefilling row
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.tokens_generated = 0

    # --- the client side (any thread) ----------------------------------------------------------------------------

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; refused at once (a ServeError) for an unknown adapter, a prompt that cannot fit, or a
        full queue."""
        if not request.prompt_ids:
            raise ServeError("the prompt is empty")
        room = self.room(request.adapter, len(request.prompt_ids))
        if request.params.max_tokens > room:
            raise ContextTooLong(f"the prompt's {len(request.prompt_ids)} tokens plus max_tokens "
                                 f"{request.params.max_tokens} exceed the model's context of {self.max_context}"
                                 + (f" (less the adapter's {self.max_context - len(request.prompt_ids) - room} "
                                    "virtual tokens)" if room < self.max_context - len(request.prompt_ids) else ""))
        handle = RequestHandle(request)
        with self._wake:
            if self._thread is None or self._stopping:
                raise EngineStopped("the engine is not running")
            if len(self._submitted) + len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} waiting requests; retry later")
            self._submitted.append(handle)
            self._wake.notify()
        if self.metrics is not None:
            self.metrics.queued()
        return handle

    def room(self, adapter: str | None, prompt_tokens: int) -> int:
        """The most output tokens a request may ask for: the context less the prompt and the adapter's virtual
        tokens (raises UnknownAdapter for an adapter not registered)."""
        virtual = 0
        if adapter is not None:
            if self.store is None:
                raise UnknownAdapter(f"no adapter named {adapter!r}: this server has none")
            self.store.check(adapter)
            virtual = self.store.virtual_tokens(adapter)
        return self.max_context - prompt_tokens - virtual

    def generate(self, prompt_ids: list[int], adapter: str | None = None,
                 params: SamplingParams | None = None) -> FinishEvent:
        """Submit one request and wait for its end (the engine must be running)."""
        handle = self.submit(GenerationRequest(prompt_ids, adapter, params or SamplingParams()))
        return [event for event in handle][-1]

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="peftkit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def stats(self) -> dict[str, int]:
        return {"waiting": len(self._submitted) + len(self._waiting), "running": len(self._rows),
                "tokens_generated": self.tokens_generated}

    # --- the scheduler thread --------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                if not (self._submitted or self._waiting or self._rows or self._stopping):
                    self._wake.wait(timeout=IDLE_TICK)
                if self._stopping:
                    self._waiting.extend(self._submitted)
                    self._submitted.clear()
                    break
                self._waiting.extend(self._submitted)
                self._submitted.clear()
            try:
                if self._waiting or self._rows:
                    self.iterate()
                else:
                    self._idle()
            except Exception as error:  # a bug or a failed forward: fail the requests in flight, keep serving
                self._fail_all(f"{type(error).__name__}: {error}")
        self._fail_all("the server is shutting down", reason="abort")

    def _idle(self) -> None:
        """Nothing runs: the store may unload what finished requests used, and the cache returns to its first size."""
        if self.store is not None:
            self.store.prepare(set(), set())
        self.cache.release()

    def iterate(self) -> None:
        """One scheduler iteration (module docstring); public so a test can drive the engine without its thread."""
        self._drop_cancelled()
        if self.store is not None:
            self.store.prepare(*self._adapter_uses())
        self._prefill()
        if self._decoding():
            self._decode()
        elif self._waiting and not self._rows and self.store is not None:  # all waiting for adapter reads
            self.store.wait_reads({h.request.adapter for h in self._waiting} - {None}, timeout=0.05)
        if self.metrics is not None:
            self.metrics.set_running(len(self._rows))
            self.metrics.set_queue(len(self._waiting))

    def _decoding(self) -> int:
        """Rows that have finished prefill (they come first)."""
        return sum(1 for row in self._rows if not row.pending and row.virtual is None)

    def _drop_cancelled(self) -> None:
        for handle in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(handle)
            handle.deliver(FinishEvent("abort", len(handle.request.prompt_ids), 0, ""))
        for index in reversed(range(len(self._rows))):
            if self._rows[index].handle.cancelled:
                self._finish(index, "abort")

    # --- admission and prefill -------------------------------------------------------------------------------------

    def _admit(self) -> _Running | None:
        """The first waiting request whose adapter is ready, in a new cache row (requests whose adapter is still
        loading keep their place; those whose load failed are answered with the error)."""
        for handle in list(self._waiting):
            adapter = handle.request.adapter
            if adapter is not None:
                try:
                    state = self.store.state(adapter)
                    if state == "failed":
                        raise AdapterUnavailable(self.store.failure(adapter))
                except ServeError as error:  # its load failed, or it was unregistered after the request came
                    self._reject(handle, str(error))
                    continue
                if state != "ready":  # still being read from disk: the request keeps its place
                    continue
            try:
                row = self._place(handle)
            except Exception as error:  # e.g. no memory for its cache row: this request fails, the others go on
                self._reject(handle, str(error) if isinstance(error, ServeError) else f"{type(error).__name__}: {error}")
                continue
            self._waiting.remove(handle)
            return row
        return None

    def _reject(self, handle: RequestHandle, message: str) -> None:
        """End a waiting request with an error before it ran."""
        self._waiting.remove(handle)
        handle.deliver(FinishEvent("error", len(handle.request.prompt_ids), 0, "", message))
        if self.metrics is not None:
            self.metrics.finished("error")

    def _place(self, handle: RequestHandle) -> _Running:
        request = handle.request
        sequence = _sequence_delta(self.model, request.adapter)
        virtual = sequence.num_virtual_tokens if sequence is not None else 0
        if virtual + len(request.prompt_ids) + request.params.max_tokens > self.max_context:  # its file changed
            raise ContextTooLong(f"the adapter's {virtual} virtual tokens, the prompt's {len(request.prompt_ids)} "
                                 f"tokens and max_tokens {request.params.max_tokens} exceed the model's context of "
                                 f"{self.max_context}")
        row = _Running(handle, TextStream(self.tokenizer, request.params.stop), generator_for(request.params),
                       list(request.prompt_ids))
        index = len(self._rows)
        self.cache.reserve(index + 1, virtual)  # the row, and its prefix if any (prefill reserves the prompt's room)
        if sequence is not None and sequence.kind == "prefix":
            with torch.inference_mode():
                self.cache.write_prefix(index, sequence.virtual())
            row.length = virtual
        elif sequence is not None:
            row.virtual = sequence.virtual()
        self._rows.append(row)
        if self.metrics is not None:
            self.metrics.started()
        return row

    def _prefill(self) -> None:
        """Prompt tokens of newcomers, at most `prefill_budget` per iteration, several rows in one forward (a partly
        prefilled row stays last)."""
        group: list[tuple[_Running, list[int], int]] = []  # (row, its chunk of prompt tokens, positions it fills)
        budget = self.prefill_budget
        while budget > 0:
            row = self._next_to_prefill(group)
            if row is None:
                break
            chunk = row.pending[:budget]
            used = len(chunk) + (0 if row.virtual is None else len(row.virtual))
            width = max(used, *(n for _, _, n in group)) if group else used
            if any(r.length + width > self.max_context for r, _, _ in [*group, (row, chunk, used)]):
                self._prefill_rows(group)  # the padded chunks would not fit: this row starts the next forward
                group = []
            row.pending = row.pending[len(chunk):]
            group.append((row, chunk, used))
            budget -= used
        self._prefill_rows(group)

    def _next_to_prefill(self, group: list[tuple[_Running, list[int], int]]) -> _Running | None:
        """The partly prefilled last row, else a newly admitted one (None: none fits or waits)."""
        last = self._rows[-1] if self._rows else None
        if last is not None and (last.pending or last.virtual is not None) and all(r is not last for r, _, _ in group):
            return last
        if len(self._rows) >= self.max_batch or not self._waiting:
            return None
        return self._admit()

    def _prefill_rows(self, group: list[tuple[_Running, list[int], int]]) -> None:
        """One forward over the group's consecutive cache rows, chunks right-padded to the longest (pad positions lie
        past each row's length: the row's next tokens overwrite them before any query can see them); rows whose
        prompt is done get their first token."""
        if not group:
            return
        first = self._rows.index(group[0][0])
        width = max(used for _, _, used in group)
        adapters = [row.adapter for row, _, _ in group]
        positions = torch.tensor([row.length for row, _, _ in group], device=self.device)
        self.cache.reserve(len(self._rows), int(positions.max()) + width)
        longest = max(len(chunk) for _, chunk, _ in group)
        ids = torch.tensor([chunk + [0] * (longest - len(chunk)) for _, chunk, _ in group], device=self.device)
        keep = width - min(used for _, _, used in group) + 1  # logits from the earliest last token on
        with torch.inference_mode():
            if all(row.virtual is None for row, _, _ in group):
                inputs = {"input_ids": ids}
            else:  # prompt adapters: their virtual tokens first, then the real ones
                with self._routing(adapters):
                    embedded = input_embeddings(self.model)(ids)
                inputs = {"inputs_embeds": self._with_virtual(group, embedded, width)}
            logits = self._forward(first, adapters, positions, width, inputs, keep)
        for row, _, used in group:
            row.length += used
            row.virtual = None
        for k in reversed(range(len(group))):  # from the end: finishing a row moves only rows already seen
            row, _, used = group[k]
            if not row.pending:
                self._emit(first + k, logits[k, used - 1 - (width - keep)])

    @staticmethod
    def _with_virtual(group: list[tuple[_Running, list[int], int]], embedded: torch.Tensor,
                      width: int) -> torch.Tensor:
        """[rows, width, d]: each row's virtual token embeddings (if any) before its chunk's, zeros after."""
        rows = embedded.new_zeros(len(group), width, embedded.shape[-1])
        for k, (row, chunk, used) in enumerate(group):
            virtual = row.virtual.to(embedded.dtype) if row.virtual is not None else embedded[k, :0]
            rows[k, :used] = torch.cat([virtual, embedded[k, :len(chunk)]])
        return rows

    # --- decode ----------------------------------------------------------------------------------------------------

    def _decode(self) -> None:
        count = self._decoding()
        rows = self._rows[:count]
        self.cache.reserve(len(self._rows), max(row.length for row in rows) + 1)
        ids = torch.tensor([[row.last_token] for row in rows], device=self.device)
        positions = torch.tensor([row.length for row in rows], device=self.device)
        with torch.inference_mode():
            logits = self._forward(0, [row.adapter for row in rows], positions, 1, {"input_ids": ids})[:, -1]
        for row in rows:
            row.length += 1
        for index in reversed(range(count)):  # from the end, so finishing a row does not move a row not yet seen
            self._emit(index, logits[index])

    def _forward(self, first_row: int, adapters: list[str | None], positions: torch.Tensor, new: int,
                 inputs: dict[str, Any], keep: int = 1) -> torch.Tensor:
        """Logits [rows, keep, vocab] at the last `keep` positions of one pass over cache rows first_row.. (each row's
        `new` tokens at its own positions)."""
        step = self.cache.step(first_row, positions, new)
        mask = step.mask()
        if not self._bool_mask:
            mask = torch.zeros(mask.shape, dtype=self.cache.dtype, device=self.device).masked_fill_(
                ~mask, torch.finfo(self.cache.dtype).min)
        with self._routing(adapters):
            out = self.model(**inputs, attention_mask=mask, position_ids=step.position_index,
                             **{self._cache_arg: step}, use_cache=True, logits_to_keep=keep)
        return out.logits.float()

    @contextmanager
    def _routing(self, adapters: list[str | None]) -> Iterator[None]:
        """Rows routed to their adapters, with this engine placing prompts and prefixes itself."""
        registry = self.model.__dict__.get(REGISTRY_ATTR)
        if registry is None:  # no adapter attached (yet): the bare model
            yield
            return
        registry.caller_places_virtual_tokens = True
        try:
            with routed(self.model, adapters):
                yield
        finally:
            registry.caller_places_virtual_tokens = False

    def _emit(self, index: int, logits: torch.Tensor) -> None:
        """Sample row `index`'s next token and stream it; finish the row on a stop token, stop string or length."""
        row = self._rows[index]
        token = next_token(logits, row.params, row.generator)
        now = time.perf_counter()
        if self.metrics is not None:
            if row.last_emit is None:
                self.metrics.first_token(now - row.handle.submitted)
            else:
                self.metrics.token_gap(now - row.last_emit)
        row.last_emit = now
        if token in self.eos:
            return self._finish(index, "stop")
        row.output.append(token)
        row.last_token = token
        self.tokens_generated += 1
        if self.metrics is not None:
            self.metrics.tokens(1)
        text, stopped = row.text.add(token)
        if text:
            row.handle.deliver(TokenEvent(text, token))
        if stopped:
            self._finish(index, "stop")
        elif len(row.output) >= row.params.max_tokens:
            self._finish(index, "length")

    def _adapter_uses(self) -> tuple[set[str], set[str]]:
        """(adapters of running and queued requests, adapters of running requests)."""
        in_use = {row.adapter for row in self._rows} - {None}
        return in_use | {h.request.adapter for h in self._waiting} - {None}, in_use

    def _finish(self, index: int, reason: FinishReason, error: str | None = None) -> None:
        row = self._rows[index]
        rest = row.text.finish() if reason in ("length", "stop") else ""
        self._remove_row(index)
        if self.store is not None:  # before the client hears of it: it may unregister the adapter right away
            self.store.release(*self._adapter_uses())
        if rest:
            row.handle.deliver(TokenEvent(rest, row.output[-1]))
        row.handle.deliver(FinishEvent(reason, len(row.handle.request.prompt_ids), len(row.output), row.text.text,
                                       error, row.output))
        if self.metrics is not None:
            self.metrics.finished(reason)

    def _remove_row(self, index: int) -> None:
        """Free cache row `index`, keeping decoding rows first: the last decoding row fills the hole, and a
        prefilling row (always last) moves up behind it."""
        decoding = self._decoding()
        last = decoding - 1 if index < decoding else index
        if index != last:
            self._move(last, index)
        if last + 1 < len(self._rows):  # the prefilling row
            self._move(len(self._rows) - 1, last)
        self._rows.pop()

    def _move(self, source: int, target: int) -> None:
        self.cache.move_row(source, target, self._rows[source].length)
        self._rows[target] = self._rows[source]

    def _fail_all(self, message: str, reason: FinishReason = "error") -> None:
        """End every request in flight with `message` (the cache rows are simply dropped)."""
        for row in self._rows:
            row.handle.deliver(FinishEvent(reason, len(row.handle.request.prompt_ids), len(row.output), row.text.text,
                                           message))
        self._rows.clear()
        while self._waiting:
            handle = self._waiting.popleft()
            handle.deliver(FinishEvent(reason, len(handle.request.prompt_ids), 0, "", message))


def _sequence_delta(model: nn.Module, adapter: str | None) -> SequenceDelta | None:
    if adapter is None:
        return None
    delta = deltas_of(model)[adapter] if adapter in deltas_of(model) else None
    return delta if delta is not None and delta.placement is Placement.SEQUENCE else None


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
