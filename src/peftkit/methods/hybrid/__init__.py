"""Hybrid adapters: several methods under one adapter name (Compose), UniPELT, MAM and per-layer-group designs."""
from .compose import Compose, ComposedDelta, SequencePart
from .layer_groups import LayerGroups, group_sizes, s4_model
from .mam import MAM
from .unipelt import UniPELT

__all__ = ["Compose", "ComposedDelta", "LayerGroups", "MAM", "SequencePart", "UniPELT", "group_sizes", "s4_model"]
