"""`peftkit serve`: many adapters over one bundled base behind an OpenAI-compatible API (docs/serving.md).

Only argparse and pydantic are imported here, so `peftkit --help` works without the `serve` extra; the server's
packages are imported when it starts (a missing one names the extra to install).
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GRACE_SECONDS = 10
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'512MB' -> 512_000_000, '1.5GiB' -> 1610612736, '4096' -> 4096 bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"--adapter-memory takes a size such as 512MB or 2GiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_adapters(pairs: list[str]) -> dict[str, Path]:
    """`["chat=runs/chat/adapter"]` -> {"chat": Path("runs/chat/adapter")}; a repeated name is an error."""
    adapters: dict[str, Path] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=DIR, got {pair!r}")
        if name in adapters:
            raise ValueError(f"--adapter {name!r} is given twice")
        adapters[name] = Path(path)
    return adapters


class ServeSettings(BaseModel):
    """Everything `peftkit serve` builds a server from (one per replica under Ray)."""

    model_config = ConfigDict(extra="forbid")

    model: Literal["smollm2", "minilm"] = "smollm2"
    adapters: dict[str, Path] = Field(default_factory=dict, description="name -> adapter directory")
    adapter_root: Path | None = Field(None, description="adapter paths must lie under it (also for load requests)")
    pins: list[str] = Field(default_factory=list, description="adapters never evicted")
    max_loaded_adapters: int | None = Field(None, ge=1)
    adapter_memory: int | None = Field(None, ge=1, description="bytes of loaded adapters")
    max_batch: int = Field(64, ge=1)
    max_queue: int = Field(256, ge=1)
    max_context: int | None = Field(2048, ge=2, description="tokens per request, prompt + output (None: the "
                                                          "model's own); the KV cache holds max_batch of them")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, min_length=1)
    device: str = Field("auto", description="auto: cuda when available, else cpu")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="default: float32 on CPU, "
                                                                                      "bfloat16 on CUDA")
    ray: bool = False
    replicas: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        unknown = [name for name in self.pins if name not in self.adapters]
        if unknown:
            raise ValueError(f"--pin {', '.join(unknown)}: not among the --adapter names")
        if self.replicas > 1 and not self.ray:
            raise ValueError("--replicas needs --ray (one process serves one replica)")
        return self


@dataclass
class Server:
    """The parts of one running server: the engine (decoders) or encoder, the store, metrics and the app."""

    engine: Any
    encoder: Any
    store: Any
    metrics: Any
    app: Any

    def start(self) -> None:
        (self.engine or self.encoder).start()

    def stop(self) -> None:
        (self.engine or self.encoder).stop()
        self.store.close()


def build_server(settings: ServeSettings) -> Server:
    """Load the bundled model, register the adapters and wire engine, store, metrics and app (not started)."""
    import torch

    from peftkit.core.io import read_adapter
    from peftkit.models import load_model, require_extra

    require_extra("fastapi", "serve")
    from .encoder import EncoderEngine, read_encoder_adapter
    from .http import create_app
    from .metrics import ServeMetrics
    from .store import AdapterStore

    device = torch.device("cuda" if settings.device == "auto" and torch.cuda.is_available()
                          else "cpu" if settings.device == "auto" else settings.device)
    dtype = settings.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model, tokenizer = load_model(settings.model, dtype=getattr(torch, dtype))
    model.to(device).eval()
    # the encoder reads classification adapters saved from MiniLM's sequence classifier, splitting their heads off
    reader = (partial(read_encoder_adapter, root=settings.adapter_root) if settings.model == "minilm"
              else read_adapter)
    store = AdapterStore(model, root=settings.adapter_root, max_loaded=settings.max_loaded_adapters,
                         max_bytes=settings.adapter_memory, reader=reader)
    for name, path in settings.adapters.items():
        if name == settings.model:
            raise ValueError(f"--adapter {name}=...: {name!r} names the base model; give the adapter another name")
        store.register(name, path, pin=name in settings.pins)
    metrics = ServeMetrics(store)
    if settings.model == "minilm":
        engine, encoder = None, EncoderEngine(model, tokenizer, store, max_batch=settings.max_batch, name="minilm",
                                              max_queue=settings.max_queue)
    else:
        from .engine import Engine

        engine = Engine(model, tokenizer, store, max_batch=settings.max_batch, max_queue=settings.max_queue,
                        max_context=settings.max_context, metrics=metrics, name=settings.model)
        encoder = None
    app = create_app(engine, store, api_key=settings.api_key, encoder=encoder, metrics=metrics)
    return Server(engine, encoder, store, metrics, app)


def settings_from(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        model=args.model, adapters=parse_adapters(args.adapter), adapter_root=args.adapter_root, pins=args.pin,
        max_loaded_adapters=args.max_loaded_adapters,
        adapter_memory=None if args.adapter_memory is None else parse_size(args.adapter_memory),
        max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context, host=args.host, port=args.port, api_key=args.api_key,
        device=args.device, dtype=args.dtype, ray=args.ray, replicas=args.replicas)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if settings.ray:
        from .ray_serve import run_ray

        return run_ray(settings)
    from peftkit.models import require_extra

    require_extra("uvicorn", "serve")
    import uvicorn

    server = build_server(settings)
    where = f"http://{settings.host}:{settings.port}/v1"
    print(f"serving {settings.model} with {len(settings.adapters)} adapters at {where}"
          + (" (API key required)" if settings.api_key else ""), flush=True)
    server.start()
    try:
        # on Ctrl-C, streams get GRACE_SECONDS to finish before they are cut (a second Ctrl-C cuts them at once)
        uvicorn.run(server.app, host=settings.host, port=settings.port, log_level="info",
                    timeout_graceful_shutdown=GRACE_SECONDS)
    finally:
        server.stop()
    return 0


def add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="serve many adapters over one base: OpenAI-compatible HTTP API with continuous batching",
        description="Serve the bundled base model with the adapters registered by --adapter (or loaded later by "
                    "POST /v1/load_lora_adapter) behind OpenAI's API: /v1/completions, /v1/chat/completions (smollm2),"
                    " /v1/embeddings and /v1/classify (minilm), /v1/models, /health, /metrics. A request's `model` "
                    "field names the adapter, or the base. See docs/serving.md.")
    serve.add_argument("--model", choices=["smollm2", "minilm"], default="smollm2",
                       help="the base: smollm2 generates (default), minilm embeds and classifies")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                       help="register an adapter (peftkit's or Hugging Face PEFT's format, safetensors); repeatable")
    serve.add_argument("--adapter-root", type=Path, metavar="DIR",
                       help="adapter directories must lie under DIR (paths outside it, `..` or symlinks out: 403)")
    serve.add_argument("--pin", action="append", default=[], metavar="NAME", help="keep this adapter loaded always")
    serve.add_argument("--max-loaded-adapters", type=int, metavar="N",
                       help="most adapters in memory at once (least recently used ones are unloaded)")
    serve.add_argument("--adapter-memory", metavar="SIZE", help="most memory for loaded adapters, e.g. 512MB, 2GiB")
    serve.add_argument("--max-batch", type=int, default=64, help="most requests decoding together (default 64)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="most requests waiting; more are refused with 429 (default 256)")
    serve.add_argument("--max-context", type=int, default=2048,
                       help="most tokens per request, prompt + output (default 2048; the KV cache grows on demand "
                            "up to max-batch x max-context positions: SmolLM2 takes 45 KiB per position in float32)")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument("--api-key", metavar="KEY", default=os.environ.get("PEFTKIT_API_KEY"),
                       help="require `Authorization: Bearer KEY` on every endpoint but /health (default: the "
                            "PEFTKIT_API_KEY environment variable, which keeps the key out of the process list)")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="weights' dtype (default: float32 on CPU, bfloat16 on CUDA)")
    serve.add_argument("--ray", action="store_true", help="serve through Ray Serve replicas (pip install "
                                                          "'peftkit[ray]')")
    serve.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray; default 1)")
    serve.set_defaults(run=run)
