"""Serving many adapters over one frozen base (docs/serving.md): an engine with continuous batching, an adapter
store, and an OpenAI-compatible HTTP API."""
from .engine import Engine, RequestHandle
from .requests import (AdapterUnavailable, ContextTooLong, FinishEvent, GenerationRequest, QueueFull, SamplingParams,
                       ServeError, TokenEvent, UnknownAdapter)

__all__ = ["Engine", "RequestHandle", "AdapterUnavailable", "ContextTooLong", "FinishEvent", "GenerationRequest", "QueueFull", "SamplingParams",
           "ServeError", "TokenEvent", "UnknownAdapter"]
