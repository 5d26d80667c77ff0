"""`peftkit serve --ray --replicas N`: the server scaled out over Ray Serve replicas (`pip install 'peftkit[ray]'`).

Each replica is a whole server (base model, adapter store, engine, the HTTP app of serve/http.py). A light router
reads each request's `model` field and passes the request on with Ray Serve's model multiplexing
(`multiplexed_model_id`; the replica marks what it holds with `serve.multiplexed` and `get_multiplexed_model_id`),
so requests for one adapter go to a replica that served it lately and has it loaded, not to every replica in turn.
Streams pass through piece by piece; a client that hangs up cancels its request on the replica.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from peftkit.models import require_extra

from .cli import Server, ServeSettings, build_server

require_extra("ray", "ray")

import ray  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402
from ray import serve  # noqa: E402

from .http import key_check, error_json  # noqa: E402
from .requests import ServeError  # noqa: E402

REPLICA_HEADER = "x-peftkit-replica"  # which replica answered (for operators and the routing test)
REGISTRY_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


async def _rest(pieces: Any) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for piece in pieces:
            yield piece
        finished = True
    finally:
        if not finished:  # the client hung up: the replica's request is cancelled, which frees its slot
            pieces.cancel()


def _model_of(body: bytes, base: str) -> str:
    """The adapter a request names ("" for the base and for requests without a JSON `model`: any replica)."""
    try:
        model = json.loads(body).get("model", "") if body else ""
    except (ValueError, AttributeError):
        return ""  # malformed: the replica's app answers with the error
    return model if isinstance(model, str) and model != base else ""


@serve.deployment
class AdapterReplica:
    """One whole server; `forward` runs one HTTP request through its app and yields the ASGI response: first
    {"status", "headers"}, then the body's pieces as bytes."""

    def __init__(self, build: Callable[[], Server], adapters_per_replica: int) -> None:
        self.server = build()
        self.server.start()
        self.tag = serve.get_replica_context().replica_tag

        async def hold(name: str) -> str:  # the store loads on first use; this records where for Ray's routing
            return name

        self.hold = serve.multiplexed(max_num_models_per_replica=adapters_per_replica)(hold)

    async def forward(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes) -> AsyncIterator[dict[str, Any] | bytes]:
        name = serve.get_multiplexed_model_id()
        if name:
            await self.hold(name)
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "root_path": "", "headers": headers, "client": None, "server": None}
        messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        hung_up = asyncio.Event()
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await hung_up.wait()  # only once the caller has gone away
            return {"type": "http.disconnect"}

        app = asyncio.create_task(self.server.app(scope, receive, messages.put))
        try:
            while True:
                message = await messages.get()
                if message["type"] == "http.response.start":
                    yield {"status": message["status"],
                           "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.tag.encode())]}
                elif message["type"] == "http.response.body":
                    yield message.get("body", b"")
                    if not message.get("more_body", False):
                        break
        finally:
            hung_up.set()
            await asyncio.wait([app], timeout=5)

    def __del__(self) -> None:
        self.server.stop()


router = FastAPI(title="peftkit serve (Ray router)")


@serve.deployment(ray_actor_options={"num_cpus": 0})  # it only parses JSON and passes bytes on
@serve.ingress(router)
class Router:
    """Reads `model` from the JSON body and routes the request to a replica holding that adapter."""

    def __init__(self, replicas: Any, base: str, api_key: str | None) -> None:
        self.replicas, self.base = replicas, base
        self.check_key = key_check(api_key) if api_key is not None else None

    @router.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @router.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(self, path: str, request: Request) -> Any:
        try:
            if self.check_key is not None:
                self.check_key(request)
        except ServeError as err:
            return error_json(err.status, str(err), err.code)
        if f"/{path}" in REGISTRY_PATHS:
            return error_json(400, "with --ray every replica has its own adapter store: register adapters with "
                                   "--adapter when starting the server", "not_supported_with_ray")
        body = await request.body()
        handle = self.replicas.options(stream=True, multiplexed_model_id=_model_of(body, self.base))
        pieces = handle.forward.remote(request.method, f"/{path}", request.url.query.encode(),
                                       list(request.headers.raw), body)
        head = await pieces.__anext__()
        return StreamingResponse(_rest(pieces), status_code=head["status"],
                                 headers={k.decode(): v.decode() for k, v in head["headers"]
                                          if k.lower() != b"content-length"})


def deployment(build: Callable[[], Server], base: str, replicas: int, *, adapters_per_replica: int = 64,
               api_key: str | None = None) -> Any:
    """The Ray Serve application: a router in front of `replicas` whole servers made by `build` (on each replica)."""
    servers = AdapterReplica.options(num_replicas=replicas).bind(build, adapters_per_replica)
    return Router.bind(servers, base, api_key)


def run_ray(settings: ServeSettings) -> int:
    """Start a local Ray instance (or join RAY_ADDRESS's cluster) and serve until interrupted."""
    ray.init()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = deployment(partial(build_server, settings), settings.model, settings.replicas,
                     adapters_per_replica=settings.max_loaded_adapters or 64, api_key=settings.api_key)
    serve.run(app, name="peftkit", route_prefix="/", blocking=True)
    return 0
