"""Serving many adapters over one frozen base (docs/serving.md): an engine with continuous batching, an adapter
store, and an OpenAI-compatible HTTP API."""
from .requests import (AdapterUnavailable, ContextTooLong, FinishEvent, GenerationRequest, QueueFull, SamplingParams,
                       ServeError, TokenEvent, UnknownAdapter)

__all__ = ["AdapterUnavailable", "ContextTooLong", "FinishEvent", "GenerationRequest", "QueueFull", "SamplingParams",
           "ServeError", "TokenEvent", "UnknownAdapter"]
