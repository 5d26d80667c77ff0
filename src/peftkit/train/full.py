"""Full fine-tuning: the base model's own parameters trained, no adapter. It is the reference a PEFT method is
measured against: `method: full` in a training config, and the bench's full-finetune and linear-probe rows.

A saved full fine-tune is a directory like an adapter's: `peftkit_full.json` (what was trained) and
`model.safetensors` (the trained tensors by state-dict key). A weight tied to another (Llama's LM head to its
embeddings) is stored once and its alias recorded, since safetensors refuses tensors that share memory.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..core.atomic import write_dir_atomically
from ..core.io import AdapterFileError, _read_tensors

FULL_CONFIG = "peftkit_full.json"
FULL_WEIGHTS = "model.safetensors"


class FullFinetune(BaseModel):
    """Full fine-tuning: every parameter of the base model is trained and saved (no adapter)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["full"] = "full"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method}


def train_base(model: nn.Module, modules: Sequence[str] | None = None) -> None:
    """Make the base model's own parameters trainable: all of them, or only those of `modules` (a linear probe)."""
    model.requires_grad_(modules is None)
    for name in modules or ():
        model.get_submodule(name).requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"nothing to train: the modules {list(modules or [])} hold no parameters")


def _state(model: nn.Module, modules: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """The trained tensors by state-dict key: the whole model's, or those under `modules`."""
    state = model.state_dict()
    if modules is None:
        return state
    return {key: value for key, value in state.items() if any(key.startswith(f"{name}.") for name in modules)}


def full_files(model: nn.Module, modules: Sequence[str] | None = None) -> dict[str, Any]:
    """{filename: JSON dict | tensor dict} of a saved full fine-tune (all parameters, or those of `modules`)."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, value in _state(model, modules).items():
        where = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), value.shape, value.stride())
        if where in first:
            tied[key] = first[where]
            continue
        first[where] = key
        tensors[key] = value.detach().cpu().contiguous()
    meta = {"format_version": 1, "method": "full", "modules": None if modules is None else list(modules), "tied": tied}
    return {FULL_CONFIG: meta, FULL_WEIGHTS: tensors}


def save_full(model: nn.Module, path: str | os.PathLike, modules: Sequence[str] | None = None) -> Path:
    """Save the fine-tuned base (all of it, or `modules`) to directory `path`, replacing it as a whole."""
    write_dir_atomically(Path(path), full_files(model, modules))
    return Path(path)


def is_full(path: str | os.PathLike) -> bool:
    """Whether directory `path` holds a saved full fine-tune (not an adapter)."""
    return (Path(path) / FULL_CONFIG).is_file()


@torch.no_grad()
def load_full(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy a saved full fine-tune into `model`, a fresh copy of its architecture; every tensor must fit."""
    path = Path(path)
    try:
        meta = json.loads((path / FULL_CONFIG).read_text())
        modules, tied = meta["modules"], meta["tied"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AdapterFileError(f"{path / FULL_CONFIG} is not a full fine-tune's config: {err}") from None
    tensors = _read_tensors(path / FULL_WEIGHTS)
    tensors.update({alias: tensors[kept] for alias, kept in tied.items() if kept in tensors})
    current = _state(model, modules)
    missing, extra = sorted(current.keys() - tensors.keys()), sorted(tensors.keys() - current.keys())
    if missing or extra:
        raise AdapterFileError(f"{path} does not fit this model: {len(missing)} tensors missing {missing[:3]}, "
                               f"{len(extra)} unexpected {extra[:3]} (a full fine-tune of another model?)")
    for key, value in current.items():
        if value.shape != tensors[key].shape:
            raise AdapterFileError(f"{path}: {key} has shape {list(tensors[key].shape)}, the model's is "
                                   f"{list(value.shape)} (another model, or another number of labels?)")
        value.copy_(tensors[key])
