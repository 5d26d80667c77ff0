"""Serving many adapters over one frozen base (docs/serving.md): an engine with continuous batching, an adapter
store, and an OpenAI-compatible HTTP API."""
from .encoder import Classification, EncoderEngine, NoClassifierHead, read_encoder_adapter
from .engine import Engine, RequestHandle
from .requests import (AdapterUnavailable, ContextTooLong, EngineStopped, FinishEvent, GenerationRequest, QueueFull,
                       SamplingParams, ServeError, TokenEvent, UnknownAdapter)
from .store import AdapterStore, PathRefused

__all__ = ["AdapterStore", "AdapterUnavailable", "Classification", "ContextTooLong", "EncoderEngine", "Engine", "EngineStopped",
           "FinishEvent", "GenerationRequest", "NoClassifierHead", "PathRefused", "QueueFull", "RequestHandle", "SamplingParams",
           "ServeError", "TokenEvent", "UnknownAdapter", "read_encoder_adapter"]
