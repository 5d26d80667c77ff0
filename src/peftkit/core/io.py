"""Adapter files: safetensors + JSON only (never pickle), written atomically.

Two layouts share one code path:
- peftkit's own: `peftkit_adapter.json` + `adapter.safetensors`, tensor keys `<module>.<tensor>`;
- Hugging Face PEFT's: `adapter_config.json` + `adapter_model.safetensors`, keys
  `base_model.model.<module>.lora_A.weight` (see `hf_peft.py` for the translation).
A directory is written in a temporary sibling and renamed into place, so a crash leaves
either the old adapter or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import hf_peft
from .config import AdapterConfig, config_from_dict
from .registry import get_registry
from .slot import SLOT_ATTR

PEFTKIT_CONFIG = "peftkit_adapter.json"
PEFTKIT_WEIGHTS = "adapter.safetensors"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """An adapter directory or file that is missing, corrupt, or does not fit the model."""


def _module_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """`<module>.<tensor>` -> tensor for one adapter, in its saved (plain) form."""
    tensors: dict[str, torch.Tensor] = {}
    for host_name in get_registry(model).hosts[name]:
        delta = getattr(model.get_submodule(host_name), SLOT_ATTR)[name]
        for key, value in delta.saved_tensors().items():
            tensors[f"{host_name}.{key}"] = value.contiguous().cpu()
    return tensors


def _write_dir_atomically(path: Path, files: dict[str, Any]) -> None:
    """Write {filename: json-able dict | tensor dict} into `path`, replacing it as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for filename, content in files.items():
            target = tmp / filename
            if filename.endswith(".json"):
                target.write_text(json.dumps(content, indent=2, sort_keys=True))
            else:
                save_file(content, str(target), metadata={"format": "pt"})
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "adapter")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(model: nn.Module, path: str | os.PathLike, name: str = "default", format: str = "peftkit") -> Path:
    """Save one adapter to directory `path` in "peftkit" or "peft" (Hugging Face PEFT) format."""
    registry = get_registry(model)
    config = registry.require(name).saved_config()
    tensors = _module_tensors(model, name)
    if format == "peftkit":
        files = {PEFTKIT_CONFIG: {"format_version": FORMAT_VERSION, "name": name, "config": config.to_dict()},
                 PEFTKIT_WEIGHTS: tensors}
    elif format == "peft":
        peft_config, peft_tensors = hf_peft.to_peft(model, config, tensors)
        files = {hf_peft.CONFIG_FILE: peft_config, hf_peft.WEIGHTS_FILE: peft_tensors}
    else:
        raise ValueError(f"unknown adapter format {format!r}; use 'peftkit' or 'peft'")
    _write_dir_atomically(Path(path), files)
    return Path(path)


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise AdapterFileError(f"adapter weights file {file} does not exist")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{file} is not a readable safetensors file (corrupt or truncated?): {err}") from None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"adapter config {file} is not valid JSON: {err}") from None


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor], str | None]:
    """Read (config, `<module>.<tensor>` tensors, saved name) from either layout."""
    path = Path(path)
    if (path / PEFTKIT_CONFIG).is_file():
        meta = _read_json(path / PEFTKIT_CONFIG)
        try:
            config = config_from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as err:
            raise AdapterFileError(f"{path / PEFTKIT_CONFIG}: {err}") from None
        return config, _read_tensors(path / PEFTKIT_WEIGHTS), meta.get("name")
    if (path / hf_peft.CONFIG_FILE).is_file():
        raw = _read_tensors(path / hf_peft.WEIGHTS_FILE)
        try:
            config, tensors = hf_peft.from_peft(_read_json(path / hf_peft.CONFIG_FILE), raw)
        except ValueError as err:
            raise AdapterFileError(f"{path / hf_peft.CONFIG_FILE}: {err}") from None
        return config, tensors, None
    raise AdapterFileError(f"{path} holds no adapter: expected {PEFTKIT_CONFIG} or {hf_peft.CONFIG_FILE}")


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, activate: bool = True) -> str:
    """Attach the adapter saved at `path` under `name` (default: its saved name or "default")."""
    from ..api import attach, remove

    config, tensors, saved_name = read_adapter(path)
    name = name or saved_name or "default"
    attach(model, config, name=name, activate=activate)
    try:
        _copy_into(model, name, tensors, Path(path))
    except Exception:
        remove(model, name)
        raise
    return name


@torch.no_grad()
def _copy_into(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected: dict[str, torch.Tensor] = {}
    for host_name in get_registry(model).hosts[name]:
        delta = getattr(model.get_submodule(host_name), SLOT_ATTR)[name]
        for key, param in delta.state_dict(keep_vars=True).items():
            expected[f"{host_name}.{key}"] = param
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise AdapterFileError(
            f"{path} does not fit this model: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, param in expected.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise AdapterFileError(
                f"{path}: tensor {key} has shape {tuple(tensors[key].shape)} in the file but "
                f"{tuple(param.shape)} in the model (was it saved from a different base model?)"
            )
    for key, param in expected.items():
        param.copy_(tensors[key])
