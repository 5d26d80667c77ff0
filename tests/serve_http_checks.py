"""The HTTP tests' pieces: a live server in a background thread, stand-ins for the engine and store (every HTTP
path without a model), adapters of several methods saved to disk with their solo references, and MiniLM
classification adapters saved as `peftkit train` saves them (shared with the encoder tests)."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from torch import nn

import peftkit
from peftkit import LoRA
from peftkit.core.config import AdapterConfig
from peftkit.models import load_minilm
from peftkit.serve.cli import Server
from peftkit.serve.engine import Engine
from peftkit.serve.http import create_app
from peftkit.serve.metrics import ServeMetrics
from peftkit.serve.store import AdapterStore
from peftkit.train.config import config_from_mapping
from peftkit.serve import (ContextTooLong, FinishEvent, GenerationRequest, QueueFull, ServeError, TokenEvent,
                           UnknownAdapter)

from .serve_checks import METHODS, randomize, smollm2_tokenizer, solo, tiny_llama, with_adapters


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on a free local port; yields its base URL and stops it afterwards."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


# --- stand-ins for the engine and the adapter store, following docs/serving.md's interface -------------------------
# (FakeEngine answers each request with words naming its adapter, so every HTTP path is checked without a model.)

class FakeStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root, self.adapters, self.counts = root, {}, {"hits": 3, "misses": 2, "evictions": 1}

    def register(self, name: str, path: Path, pin: bool = False) -> None:
        if name in self.adapters:
            raise ServeError(f"adapter {name!r} is already registered")
        if self.root is not None and not path.resolve().is_relative_to(self.root.resolve()):
            raise Refused(f"{path} is outside the adapter root")
        self.adapters[name] = path

    def unregister(self, name: str) -> None:
        self.check(name)
        del self.adapters[name]

    def names(self) -> list[str]:
        return list(self.adapters)

    def check(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownAdapter(f"no adapter named {name!r}")

    def stats(self) -> dict[str, int]:
        return {**self.counts, "loaded": len(self.adapters), "loaded_bytes": 1000 * len(self.adapters)}


class Refused(ServeError):
    status = 403
    code = "path_refused"


class FakeHandle:
    def __init__(self, engine: FakeEngine, request: GenerationRequest) -> None:
        self.engine, self.request, self.cancelled = engine, request, False
        label = request.adapter or "base"
        self.pieces = [f" {label}{i}" for i in range(request.params.max_tokens)]

    def _finish(self, n: int, reason: str) -> FinishEvent:
        self.engine.running.discard(self)
        return FinishEvent(reason, len(self.request.prompt_ids), n, "".join(self.pieces[:n]))

    def __iter__(self) -> Iterator[TokenEvent | FinishEvent]:
        for i, piece in enumerate(self.pieces):
            yield TokenEvent(piece, i)
        yield self._finish(len(self.pieces), "length")

    async def stream(self) -> AsyncIterator[TokenEvent | FinishEvent]:
        for i, piece in enumerate(self.pieces):
            await asyncio.sleep(self.engine.delay)
            if self.cancelled:
                yield self._finish(i, "abort")
                return
            yield TokenEvent(piece, i)
        yield self._finish(len(self.pieces), "length")

    def cancel(self) -> None:
        self.cancelled = True
        self.engine.cancelled.append(self.request.id)
        self.engine.running.discard(self)


class FakeEngine:
    def __init__(self, store: FakeStore, *, max_context: int = 64, max_queue: int = 4, delay: float = 0.0,
                 name: str = "fake-base") -> None:
        self.store, self.max_context, self.max_queue, self.delay, self.name = store, max_context, max_queue, delay, name
        self.running: set[FakeHandle] = set()
        self.cancelled: list[str] = []

    def prompt_ids(self, prompt: str) -> list[int]:
        return [ord(c) for c in prompt]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.prompt_ids("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def room(self, adapter: str | None, prompt_tokens: int) -> int:
        if adapter is not None:
            self.store.check(adapter)
        return self.max_context - prompt_tokens

    def submit(self, request: GenerationRequest) -> FakeHandle:
        if request.params.max_tokens > self.room(request.adapter, len(request.prompt_ids)):
            raise ContextTooLong(f"{len(request.prompt_ids)} + {request.params.max_tokens} > {self.max_context}")
        if len(self.running) >= self.max_queue:
            raise QueueFull(f"{len(self.running)} requests are waiting")
        handle = FakeHandle(self, request)
        self.running.add(handle)
        return handle


# --- adapters of several methods on disk, and their solo answers ---------------------------------------------------

# Eight adapters of six methods: the engine tests' six, a second LoRA, and a LoRA saved by Hugging Face `peft`.
MORE = {"lora-small": LoRA(r=2, targets=["o_proj", "down_proj"])}
ADAPTERS = [*METHODS, *MORE, "peft-lora"]


def save_adapters(root: Path) -> nn.Module:
    """Save ADAPTERS (random, non-zero) under `root`/NAME; return the tiny base with all of them attached, the
    reference for solo answers."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = with_adapters(tiny_llama())
    for name, config in MORE.items():
        peftkit.attach(model, config, name, activate=False)
        randomize(model, name)
    for name in peftkit.adapters(model):
        peftkit.save(model, root / name, name)
    lora = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                          init_lora_weights=False)  # B random too, so the adapter changes the outputs
    get_peft_model(tiny_llama(), lora).save_pretrained(root / "peft-lora")
    peftkit.load(model, root / "peft-lora", name="peft-lora", activate=False)
    return model


def solo_answer(reference: nn.Module, adapter: str | None, prompt_ids: list[int], max_tokens: int) -> tuple[str, int]:
    """(text, completion tokens) of `generate` run alone, greedy, with one adapter (None: the base)."""
    tokens = solo(reference, prompt_ids, adapter, max_tokens)
    return smollm2_tokenizer().decode(tokens, skip_special_tokens=True), len(tokens)


def tiny_server(root: Path, max_loaded: int | None = None) -> Server:
    """A server (not started) over the tiny base with ADAPTERS (saved under `root`) registered."""
    store = AdapterStore(tiny_llama(), root=root, max_loaded=max_loaded)
    for name in ADAPTERS:
        store.register(name, root / name)
    metrics = ServeMetrics(store)
    engine = Engine(store.model, smollm2_tokenizer(), store, max_batch=16, max_context=128, metrics=metrics,
                    name="tiny")
    return Server(engine, None, store, metrics, create_app(engine, store, metrics=metrics))


# --- MiniLM classification adapters --------------------------------------------------------------------------------

def save_classifier(run_dir: Path, config: AdapterConfig, num_labels: int, data: dict[str, Any] | None = None,
                    std: float = 0.1) -> nn.Module:
    """A MiniLM sequence classifier with `config` and a copy of its head attached (random, non-zero), saved as
    `peftkit train` saves it: the adapter in `run_dir`/adapter and, given a run's `data` section, the run's
    config.yaml beside it. Returns the classifier with the adapter active, the reference for solo answers."""
    model, _ = load_minilm(num_labels=num_labels)
    config = config.model_copy(update={"modules_to_save": ["classifier"]})
    peftkit.attach(model, config, "default")
    randomize(model, "default", std)
    peftkit.save(model, run_dir / "adapter")
    if data is not None:
        run = config_from_mapping({"task": "classify-text", "method": config.to_dict(), "data": data})
        (run_dir / "config.yaml").write_text(yaml.safe_dump(run.to_dict(), sort_keys=False), encoding="utf-8")
    return model.eval()
