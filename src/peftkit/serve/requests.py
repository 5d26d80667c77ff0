"""What a client asks the serving engine for, and what it gets back, independent of HTTP."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "abort", "error"]
_ids = itertools.count()


class ServeError(Exception):
    """A request the engine refuses; `status` is the HTTP status the API answers with."""

    status = 400
    code = "invalid_request_error"


class UnknownAdapter(ServeError):
    status = 404
    code = "model_not_found"


class ContextTooLong(ServeError):
    status = 400
    code = "context_length_exceeded"


class QueueFull(ServeError):
    status = 429
    code = "queue_full"


class EngineStopped(ServeError):
    """The engine is not running (not started yet, or shut down)."""

    status = 503
    code = "service_unavailable"


class AdapterUnavailable(ServeError):
    """The adapter is registered but its load failed (corrupt file, does not fit the base)."""

    status = 500
    code = "adapter_load_failed"


class SamplingParams(BaseModel):
    """How to pick each next token; temperature 0 is greedy. `seed` makes sampling reproducible per request."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(16, ge=1, description="most tokens to generate")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0: greedy (argmax)")
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="nucleus sampling mass (0: the most likely token only)")
    seed: int | None = Field(None, description="seed of this request's own generator")
    stop: list[str] = Field(default_factory=list, description="strings that end the output (not included in it)")


@dataclass
class GenerationRequest:
    """One generation: token ids already built from a prompt or chat messages, for `adapter` (None: the base)."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass
class TokenEvent:
    """New output text (may be empty while a possible stop string or a partial character is held back)."""

    text: str
    token_id: int


@dataclass
class FinishEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole output
    error: str | None = None
    tokens: list[int] = field(default_factory=list)  # the output's token ids
