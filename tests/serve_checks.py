"""A live HTTP server in a background thread, for tests that talk to it as clients do."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit import IA3, LoRA, PrefixTuning
from peftkit.models import load_smollm2
from peftkit.serve import (ContextTooLong, FinishEvent, GenerationRequest, QueueFull, ServeError, TokenEvent,
                           UnknownAdapter)

from .conftest import randomize


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

    def submit(self, request: GenerationRequest) -> FakeHandle:
        if request.adapter is not None:
            self.store.check(request.adapter)
        if len(request.prompt_ids) + request.params.max_tokens > self.max_context:
            raise ContextTooLong(f"{len(request.prompt_ids)} + {request.params.max_tokens} > {self.max_context}")
        if len(self.running) >= self.max_queue:
            raise QueueFull(f"{len(self.running)} requests are waiting")
        handle = FakeHandle(self, request)
        self.running.add(handle)
        return handle


# --- a real engine over a tiny random Llama with SmolLM2's tokenizer, and adapters of several methods ------------

@functools.cache
def smollm2_tokenizer() -> Any:
    return load_smollm2()[1]


def tiny_llama_for(tokenizer: Any) -> LlamaForCausalLM:
    """Random weights, fixed by seed; SmolLM2's vocabulary so its tokenizer and chat template apply."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


# name -> config; "peft-lora" is saved by Hugging Face `peft` (see save_adapters)
ADAPTERS: dict[str, Any] = {
    "lora-a": LoRA(r=2, targets=["q_proj", "v_proj"]),
    "lora-b": LoRA(r=8, alpha=4, targets="all-linear"),
    "lora-c": LoRA(r=4, targets=["o_proj", "down_proj"]),
    "ia3-a": IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
    "ia3-b": IA3(targets=["q_proj", "up_proj"]),
    "prefix-a": PrefixTuning(num_virtual_tokens=3),
    "prefix-b": PrefixTuning(num_virtual_tokens=7),
    "peft-lora": None,
}


def save_adapters(base: nn.Module, root: Path) -> dict[str, Path]:
    """Each of ADAPTERS with random non-zero weights, saved under `root` (peftkit's format, or peft's)."""
    paths = {}
    for name, config in ADAPTERS.items():
        model, paths[name] = copy.deepcopy(base), root / name
        if config is None:
            lora = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                  init_lora_weights=False)  # random B too: the adapter changes outputs
            get_peft_model(model, lora).save_pretrained(paths[name])
        else:
            peftkit.attach(model, config, name)
            randomize(model, name)
            peftkit.save(model, paths[name], name)
    return paths


class Solo:
    """Reference answers: Hugging Face `generate` (greedy) on a copy of the base with one adapter active."""

    def __init__(self, base: nn.Module, tokenizer: Any, paths: dict[str, Path]) -> None:
        self.model, self.tokenizer = copy.deepcopy(base), tokenizer
        for name, path in paths.items():
            peftkit.load(self.model, path, name=name, activate=False)

    def __call__(self, adapter: str | None, prompt_ids: list[int], max_tokens: int) -> tuple[str, int]:
        """(text, completion tokens) of a greedy answer."""
        ids = torch.tensor([prompt_ids])
        with torch.no_grad(), (peftkit.disabled(self.model) if adapter is None else contextlib.nullcontext()):
            if adapter is not None:
                peftkit.activate(self.model, adapter)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      do_sample=False)[0, len(prompt_ids):].tolist()
        if self.tokenizer.eos_token_id in out:
            out = out[:out.index(self.tokenizer.eos_token_id) + 1]
        return self.tokenizer.decode(out, skip_special_tokens=True), len(out)
