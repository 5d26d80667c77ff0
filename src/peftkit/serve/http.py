"""OpenAI-compatible HTTP API over the serving engine (docs/serving.md).

The request's `model` names an adapter, or the base (the engine's name). Every error is OpenAI's JSON,
`{"error": {"message", "type", "param", "code"}}`, with the status of the `ServeError` raised; a malformed body or
field (unknown fields included: nothing is silently ignored) is 400 naming the field.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from peftkit.models import require_extra

from .requests import ContextTooLong, FinishEvent, GenerationRequest, SamplingParams, ServeError, TokenEvent

require_extra("fastapi", "serve")

from fastapi import APIRouter, Depends, FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from .metrics import ServeMetrics  # noqa: E402

VALIDATION_STATUS = 400  # OpenAI answers a malformed request with 400 (FastAPI's own default is 422)


class Unauthorized(ServeError):
    status = 401
    code = "invalid_api_key"


class GenerationFailed(ServeError):
    """The engine failed while generating (the request was accepted)."""

    status = 500
    code = "generation_failed"


class NotServed(ServeError):
    """The endpoint needs a kind of model (decoder or encoder) this server does not run."""

    status = 404
    code = "model_not_found"


_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_json(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


# --- request bodies ----------------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


# Fields OpenAI clients send that this server accepts only at the value that changes nothing.
_NEUTRAL = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0}


class _Generation(SamplingParams):
    """What completions and chat share: the adapter (`model`), sampling, streaming."""

    model: str
    stop: str | list[str] | None = Field(None, description="a string or up to 4 strings that end the output")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="the caller's end-user id; accepted, not used")
    n: int = Field(1, description="choices per request: only 1")
    presence_penalty: float = Field(0.0, description="only 0 (no penalty)")
    frequency_penalty: float = Field(0.0, description="only 0 (no penalty)")

    @field_validator(*_NEUTRAL)
    @classmethod
    def _neutral_only(cls, value: float, info: Any) -> float:
        if value != _NEUTRAL[info.field_name]:
            raise ValueError(f"only {_NEUTRAL[info.field_name]} is supported")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Generation:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def sampling(self, max_tokens: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        fields = self.model_dump(include=set(SamplingParams.model_fields))
        return SamplingParams.model_validate({**fields, "stop": stops, "max_tokens": max_tokens})


class CompletionBody(_Generation):
    prompt: str


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": text}


class ChatBody(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: what the context leaves after the prompt")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")

    @model_validator(mode="after")
    def _one_limit(self) -> ChatBody:
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; send one")
        return self

    def limit(self, prompt_tokens: int, room: int) -> int:
        """max_tokens as sent, or by default all the `room` the context leaves (after prompt and virtual tokens)."""
        wanted = self.max_completion_tokens or self.max_tokens
        if wanted is None and room < 1:
            raise ContextTooLong(f"the prompt's {prompt_tokens} tokens leave no room to answer in the context")
        return wanted or room


class _EncoderBody(BaseModel):
    """What embeddings and classification share: the adapter (`model`) and one text or a list of texts."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str] = Field(min_length=1)
    user: str | None = Field(None, description="the caller's end-user id; accepted, not used")

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class EmbeddingBody(_EncoderBody):
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: None = Field(None, description="only the model's own size")


class ClassifyBody(_EncoderBody):
    """vLLM's classification request (POST /v1/classify)."""


class LoadAdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, description="the name requests use as `model`")
    lora_path: str = Field(min_length=1, description="adapter directory (under --adapter-root when one is set)")
    pin: bool = Field(False, description="never evicted from memory")


class UnloadAdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)


# --- responses ---------------------------------------------------------------------------------------------------

@dataclass
class _Reply:
    """One response's identity, and the shapes in which completions and chat differ."""

    chat: bool
    model: str
    id: str
    created: int

    @classmethod
    def new(cls, chat: bool, model: str) -> _Reply:
        return cls(chat, model, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()))

    def _object(self, chunk: bool) -> str:
        return ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")

    def _choice(self, text: str | None, reason: str | None, chunk: bool, role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        content = {} if text is None else {"content": text}
        if chunk:
            delta = {"role": "assistant", **content} if role else content
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "message": {"role": "assistant", **content}, "logprobs": None, "finish_reason": reason}

    def _head(self, chunk: bool) -> dict[str, Any]:
        return {"id": self.id, "object": self._object(chunk), "created": self.created, "model": self.model}

    def whole(self, finish: FinishEvent) -> dict[str, Any]:
        return {**self._head(False), "choices": [self._choice(finish.text, finish.reason, False)],
                "usage": _usage(finish)}

    def chunk(self, text: str | None, reason: str | None = None, *, role: bool = False, usage: bool = False) -> str:
        """One streamed piece; with `usage` (stream_options.include_usage) it carries `"usage": null`."""
        body = {**self._head(True), "choices": [self._choice(text, reason, True, role)]}
        return _sse({**body, "usage": None} if usage else body)

    def usage_chunk(self, finish: FinishEvent) -> str:
        return _sse({**self._head(True), "choices": [], "usage": _usage(finish)})


def _usage(finish: FinishEvent) -> dict[str, int]:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# --- driving a request -------------------------------------------------------------------------------------------

async def _events(handle: Any) -> AsyncIterator[TokenEvent | FinishEvent]:
    """The handle's events; if the consumer goes away first (cancelled: the client disconnected), the request is
    cancelled so its slot and cache rows are freed at once."""
    finished = False
    try:
        async for event in handle.stream():
            finished = isinstance(event, FinishEvent)
            yield event
    finally:
        if not finished:
            handle.cancel()


async def _cancel_on_disconnect(request: Request, handle: Any) -> None:
    """Wait for the client to hang up, then cancel its request (a non-streaming reply has nothing else to notice)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


async def _finish(handle: Any, request: Request) -> FinishEvent:
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    try:
        async for event in _events(handle):
            if isinstance(event, FinishEvent):
                return event
        raise RuntimeError("the engine ended a request without a FinishEvent")
    finally:
        watcher.cancel()


async def _stream(handle: Any, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's server-sent events: a role chunk (chat), one chunk per text piece, one with the finish reason, the
    usage chunk when asked for, then [DONE]."""
    if reply.chat:
        yield reply.chunk("", role=True, usage=include_usage)
    async for event in _events(handle):
        if isinstance(event, TokenEvent):
            if event.text:
                yield reply.chunk(event.text, usage=include_usage)
        elif event.reason == "error":
            yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                  "param": None, "code": GenerationFailed.code}})
        else:
            yield reply.chunk(None, event.reason, usage=include_usage)
            if include_usage:
                yield reply.usage_chunk(event)
    yield "data: [DONE]\n\n"


# --- the app -----------------------------------------------------------------------------------------------------

def key_check(api_key: str) -> Callable[[Request], None]:
    expected = f"Bearer {api_key}".encode()

    def check(request: Request) -> None:
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, expected):
            raise Unauthorized("missing or wrong API key: send the header `Authorization: Bearer KEY`")

    return check


def _field_errors(exc: RequestValidationError) -> tuple[str, str]:
    """(message naming each bad field, the first field's dotted path)."""
    parts, params = [], []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        param = ".".join(loc[1:] if loc[:1] == ["body"] else loc)
        if error["type"] == "json_invalid":
            message = f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
            param = ""
        elif error["type"] == "extra_forbidden":
            message = f"{param}: unknown field (not supported by this server)"
        else:
            message = f"{param or 'body'}: {error['msg'].removeprefix('Value error, ')}"
        parts.append(message)
        params.append(param)
    return "; ".join(parts), params[0] if params else ""


def create_app(engine: Any, store: Any, *, api_key: str | None = None, encoder: Any = None,
               metrics: ServeMetrics | None = None) -> FastAPI:
    """The server's FastAPI app. `engine` runs a decoder (None on an encoder-only server), `encoder` embeds and
    classifies; `metrics` is the ServeMetrics the engine reports to (default: one that shows the store's cache only)."""
    if engine is None and encoder is None:
        raise ValueError("create_app needs an engine (decoder) or an encoder")
    base = engine.name if engine is not None else encoder.name
    metrics = metrics if metrics is not None else ServeMetrics(store)
    # with a key, the interactive docs would be the one place answering without it: they are off then
    closed = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="peftkit serve", description=f"adapters over {base}", **closed)
    started = int(time.time())

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        metrics.refused(exc.code)
        return error_json(exc.status, str(exc), exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _field_errors(exc)
        metrics.refused("invalid_request_error")
        return error_json(VALIDATION_STATUS, message, "invalid_request_error", param or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_json(exc.status_code, message, "not_found" if exc.status_code == 404 else "http_error")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    api = APIRouter(dependencies=[Depends(key_check(api_key))] if api_key is not None else [])

    def adapter(model: str) -> str | None:
        return None if model == base else model

    def decoder() -> Any:
        if engine is None:
            raise NotServed(f"this server runs the encoder {base!r}: it serves /v1/embeddings, not generation")
        return engine

    async def generate(body: _Generation, prompt_ids: list[int], max_tokens: int, chat: bool,
                       request: Request) -> Response:
        generation = GenerationRequest(prompt_ids, adapter(body.model), body.sampling(max_tokens),
                                       id=uuid.uuid4().hex)
        handle = engine.submit(generation)
        reply = _Reply.new(chat, body.model)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(handle, reply, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        finish = await _finish(handle, request)
        if finish.reason == "error":
            raise GenerationFailed(f"generation failed: {finish.error}")
        return JSONResponse(reply.whole(finish))

    @api.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        prompt_ids = decoder().prompt_ids(body.prompt)
        return await generate(body, prompt_ids, body.max_tokens, False, request)

    @api.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request) -> Response:
        prompt_ids = decoder().chat_ids([message.plain() for message in body.messages])
        room = engine.room(adapter(body.model), len(prompt_ids))
        return await generate(body, prompt_ids, body.limit(len(prompt_ids), room), True, request)

    def encoding(what: str) -> Any:
        if encoder is None:
            raise NotServed(f"this server runs the decoder {base!r}: start `peftkit serve --model minilm` for {what}")
        return encoder

    @api.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody) -> dict[str, Any]:
        texts = body.texts()
        vectors = await asyncio.to_thread(encoding("embeddings").embed, texts, adapter(body.model))
        counted = encoder.tokenizer(texts, truncation=True, max_length=encoder.max_length)["input_ids"]
        tokens = sum(len(ids) for ids in counted)
        return {"object": "list", "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
                         for i, vector in enumerate(vectors)]}

    @api.post("/v1/classify")
    async def classify(body: ClassifyBody) -> dict[str, Any]:
        """vLLM's classification response: per text the label, the probabilities in class order, the class count."""
        results = await asyncio.to_thread(encoding("classification").classify, body.texts(), adapter(body.model))
        tokens = sum(result.tokens for result in results)
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": body.model,
                "data": [{"index": i, "label": result.label, "probs": list(result.probs.values()),
                          "num_classes": len(result.probs)} for i, result in enumerate(results)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        def card(name: str, parent: str | None) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": started, "owned_by": "peftkit", "parent": parent}

        return {"object": "list", "data": [card(base, None)] + [card(name, base) for name in store.names()]}

    @api.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterBody) -> PlainTextResponse:
        if body.lora_name == base:
            raise ServeError(f"{base!r} is the base model's name; pick another adapter name")
        await asyncio.to_thread(store.register, body.lora_name, Path(body.lora_path), pin=body.pin)
        return PlainTextResponse(f"Success: adapter {body.lora_name!r} registered (loaded on first use)")

    @api.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterBody) -> PlainTextResponse:
        await asyncio.to_thread(store.unregister, body.lora_name)
        return PlainTextResponse(f"Success: adapter {body.lora_name!r} unregistered")

    @api.get("/metrics")
    async def scrape() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(api)
    return app


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
