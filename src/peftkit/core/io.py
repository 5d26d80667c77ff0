"""Adapter files: safetensors + JSON only (never pickle), written atomically.

Two layouts share one code path:
- peftkit's own: `peftkit_adapter.json` + `adapter.safetensors`, tensor keys `<module>.<tensor>`;
- Hugging Face PEFT's: `adapter_config.json` + `adapter_model.safetensors`, keys
  `base_model.model.<module>.lora_A.weight` (see `hf_peft.py` for the translation).
A directory is written in a temporary sibling and renamed into place, so a crash leaves
either the old adapter or the new one, never half of one (between the two renames that
replace an existing directory, the old one waits in a `.<name>.<token>.old` sibling).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import hf_peft
from .config import AdapterConfig, config_from_dict
from .registry import adapter_deltas, get_registry

PEFTKIT_CONFIG = "peftkit_adapter.json"
PEFTKIT_WEIGHTS = "adapter.safetensors"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """An adapter directory or file that is missing, corrupt, or does not fit the model."""


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """`<module>.<tensor>` -> tensor for one adapter, in its saved (plain) form."""
    tensors: dict[str, torch.Tensor] = {}
    for host_name, _, delta in adapter_deltas(model, name):
        for key, value in delta.saved_tensors().items():
            tensors[f"{host_name}.{key}"] = value.contiguous().cpu()
    return tensors


def write_dir_atomically(path: Path, files: dict[str, Any]) -> None:
    """Write {filename: json-able dict | tensor dict} into `path`, replacing it as a whole."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not an adapter directory; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the directory keeps the user's umask (mkdtemp's 0700 would lock out other readers).
    token = uuid.uuid4().hex
    tmp, old = path.parent / f".{path.name}.{token}.tmp", path.parent / f".{path.name}.{token}.old"
    tmp.mkdir()
    try:
        for filename, content in files.items():
            target = tmp / filename
            if filename.endswith(".json"):
                target.write_text(json.dumps(content, indent=2, sort_keys=True))
            else:
                save_file(content, str(target), metadata={"format": "pt"})
        if path.exists():  # a directory cannot be renamed onto a non-empty one: move the old one aside first
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(model: nn.Module, path: str | os.PathLike, name: str = "default", format: str = "peftkit") -> Path:
    """Save one adapter to directory `path` in "peftkit" or "peft" (Hugging Face PEFT) format."""
    write_dir_atomically(Path(path), adapter_files(model, name, format))
    return Path(path)


def adapter_files(model: nn.Module, name: str = "default", format: str = "peftkit") -> dict[str, Any]:
    """{filename: JSON dict | tensor dict} of one saved adapter (the trainer adds its state beside them)."""
    registry = get_registry(model)
    config = registry.require(name).saved_config()
    tensors = adapter_tensors(model, name)
    if format == "peftkit":
        files = {PEFTKIT_CONFIG: {"format_version": FORMAT_VERSION, "name": name, "config": config.to_dict()},
                 PEFTKIT_WEIGHTS: tensors}
    elif format == "peft":
        peft_config, peft_tensors = hf_peft.to_peft(model, config, tensors)
        files = {hf_peft.CONFIG_FILE: peft_config, hf_peft.WEIGHTS_FILE: peft_tensors}
    else:
        raise ValueError(f"unknown adapter format {format!r}; use 'peftkit' or 'peft'")
    return files


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        pickled = file.with_suffix(".bin")
        hint = f"; {pickled.name} is a pickle, which peftkit never loads: re-save it as safetensors" if pickled.is_file() else ""
        raise AdapterFileError(f"adapter weights file {file} does not exist{hint}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{file} is not a readable safetensors file (corrupt or truncated?): {err}") from None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        content = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"adapter config {file} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise AdapterFileError(f"adapter config {file} must hold a JSON object, not {type(content).__name__}")
    return content


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor], str | None]:
    """Read (config, `<module>.<tensor>` tensors, saved name) from either layout."""
    path = Path(path)
    if (path / PEFTKIT_CONFIG).is_file():
        meta = _read_json(path / PEFTKIT_CONFIG)
        try:
            config = config_from_dict(meta["config"])
        except KeyError:
            raise AdapterFileError(f"{path / PEFTKIT_CONFIG} lacks the 'config' field") from None
        except (TypeError, ValueError) as err:
            raise AdapterFileError(f"{path / PEFTKIT_CONFIG}: {err}") from None
        if config.rewrites_base:  # saved adapters are plain (`saved_config`); attaching this would rewrite the base
            raise AdapterFileError(f"{path / PEFTKIT_CONFIG} asks for an init that rewrites the base weights (PiSSA); "
                                   "saved adapters never do: was the file edited by hand?")
        return config, _read_tensors(path / PEFTKIT_WEIGHTS), meta.get("name")
    if (path / hf_peft.CONFIG_FILE).is_file():
        raw = _read_tensors(path / hf_peft.WEIGHTS_FILE)
        try:
            config, tensors = hf_peft.from_peft(_read_json(path / hf_peft.CONFIG_FILE), raw)
        except (TypeError, ValueError) as err:  # TypeError: a field of the wrong JSON type
            raise AdapterFileError(f"{path / hf_peft.CONFIG_FILE}: {err}") from None
        return config, tensors, None
    raise AdapterFileError(f"{path} holds no adapter: expected {PEFTKIT_CONFIG} or {hf_peft.CONFIG_FILE}")


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, activate: bool = True) -> str:
    """Attach the adapter saved at `path` under `name` (default: its saved name or "default").

    On any error the model is left as it was: no half-loaded adapter, the same active ones.
    """
    from ..api import attach, remove

    config, tensors, saved_name = read_adapter(path)
    name = name or saved_name or "default"
    attach(model, config, name=name, activate=False)
    try:
        _copy_into(model, name, tensors, Path(path))
    except BaseException:  # even on Ctrl-C: no half-loaded adapter
        remove(model, name)
        raise
    if activate:
        get_registry(model).active = [name]
    return name


def _shape_error(path: Path, key: str, saved: torch.Tensor, current: torch.Tensor) -> AdapterFileError:
    return AdapterFileError(
        f"{path}: tensor {key} has shape {tuple(saved.shape)} in the file but {tuple(current.shape)} "
        f"in the model (was it saved from a different base model?)"
    )


def _check_base_tensors(model: nn.Module, base: dict[str, torch.Tensor], path: Path) -> None:
    """Base weights PEFT saved beside an adapter must be this model's: we never overwrite the base."""
    state = model.state_dict() if base else {}
    for key, saved in base.items():
        current = state.get(key)
        if current is None:
            raise AdapterFileError(f"{path}: tensor {key} is neither part of the adapter nor a weight of this model")
        if saved.shape != current.shape:
            raise _shape_error(path, key, saved, current)
        if not torch.equal(saved, current.detach().to("cpu", saved.dtype)):  # compare at the file's precision
            raise AdapterFileError(
                f"{path} carries base weight {key} (PEFT saves embedding layers that are targeted or resized) and it "
                f"differs from this model's; peftkit never replaces base weights: load the base it was trained on"
            )


def _by_host(tensors: dict[str, torch.Tensor], hosts: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """host -> {key below it: tensor}, every file tensor under its deepest host: a file may hold tensors the
    fresh delta lacks (a selective mask's indices), and a head copy must not receive its child's LoRA keys."""
    owned: dict[str, dict[str, torch.Tensor]] = {host: {} for host in hosts}
    for key, value in tensors.items():
        owner = max((host for host in hosts if key.startswith(f"{host}.")), key=len, default=None)
        if owner is not None:
            owned[owner][key[len(owner) + 1:]] = value
    return owned


@torch.no_grad()
def _copy_into(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Check every tensor first, then copy: a bad file must not leave a half-written adapter."""
    base = {k[len(hf_peft.BASE_MARK):]: v for k, v in tensors.items() if k.startswith(hf_peft.BASE_MARK)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(hf_peft.BASE_MARK)}
    expected: dict[str, torch.Tensor] = {}
    owned = _by_host(tensors, get_registry(model).hosts[name])
    for host_name, _, delta in adapter_deltas(model, name):
        delta.prepare_load(owned[host_name])  # a delta whose shapes change in training (a pruned rank) takes the file's
        for key, param in delta.state_dict(keep_vars=True).items():
            expected[f"{host_name}.{key}"] = param
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise AdapterFileError(
            f"{path} does not fit this model: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, param in expected.items():
        saved = tensors[key]
        if saved.shape != param.shape:
            raise _shape_error(path, key, saved, param)
        if param.is_floating_point() and not saved.is_floating_point():  # copy_ would silently cast garbage
            raise AdapterFileError(f"{path}: tensor {key} has dtype {saved.dtype}; a floating-point tensor is needed")
    _check_base_tensors(model, base, path)
    for key, param in expected.items():
        param.copy_(tensors[key])
