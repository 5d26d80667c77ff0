"""Adapter files: safetensors + JSON only (never pickle), written atomically.

Two layouts share one code path:
- peftkit's own: `peftkit_adapter.json` + `adapter.safetensors`, tensor keys `<module>.<tensor>`;
- Hugging Face PEFT's: `adapter_config.json` + `adapter_model.safetensors`, keys
  `base_model.model.<module>.lora_A.weight` (see `hf_peft.py` for the translation).
A directory is written in a temporary sibling and swapped into place (`core.atomic`), so a
process killed at any instant leaves either the old adapter or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import hf_peft
from .atomic import recover, write_dir_atomically
from .merging import unfolded
from .config import AdapterConfig, config_from_dict
from .registry import adapter_deltas, get_registry
from .weight_masks import dense_form, sparse_form

PEFTKIT_CONFIG = "peftkit_adapter.json"
PEFTKIT_WEIGHTS = "adapter.safetensors"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """An adapter directory or file that is missing, corrupt, or does not fit the model."""


def adapter_tensors(model: nn.Module, name: str, sparse: bool = False) -> dict[str, torch.Tensor]:
    """`<module>.<tensor>` -> tensor for one adapter, in its saved (plain) form; with `sparse`, pruned parameters as
    their kept values and mask bits (`core.weight_masks`)."""
    tensors: dict[str, torch.Tensor] = {}
    for host_name, _, delta in adapter_deltas(model, name):
        saved = delta.saved_tensors()
        for key, value in (sparse_form(delta, saved) if sparse else saved).items():
            tensors[f"{host_name}.{key}"] = value.contiguous().cpu()
    return tensors


def save(model: nn.Module, path: str | os.PathLike, name: str = "default", format: str = "peftkit") -> Path:
    """Save one adapter to directory `path` in "peftkit" or "peft" (Hugging Face PEFT) format."""
    write_dir_atomically(Path(path), adapter_files(model, name, format))
    return Path(path)


def adapter_files(model: nn.Module, name: str = "default", format: str = "peftkit") -> dict[str, Any]:
    """{filename: JSON dict | tensor dict} of one saved adapter (the trainer adds its state beside them)."""
    registry = get_registry(model)
    config = registry.require(name).saved_config()
    if format not in ("peftkit", "peft"):
        raise ValueError(f"unknown adapter format {format!r}; use 'peftkit' or 'peft'")
    # merged, a head copy holds the base's tensors and the base bias holds the change: read them unfolded
    with unfolded(model, registry, registry.hosts[name] if name in registry.merged else []):
        tensors = adapter_tensors(model, name, sparse=format == "peftkit")  # PEFT's layout: dense (no masks)
        if format == "peftkit":
            return {PEFTKIT_CONFIG: {"format_version": FORMAT_VERSION, "name": name, "config": config.to_dict()},
                    PEFTKIT_WEIGHTS: tensors}
        peft_config, peft_tensors = hf_peft.to_peft(model, config, tensors)
        return {hf_peft.CONFIG_FILE: peft_config, hf_peft.WEIGHTS_FILE: peft_tensors}


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        pickled = file.with_suffix(".bin")
        hint = f"; {pickled.name} is a pickle, which peftkit never loads: re-save it as safetensors" if pickled.is_file() else ""
        raise AdapterFileError(f"adapter weights file {file} does not exist{hint}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{file} is not a readable safetensors file (corrupt or truncated?): {err}") from None
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not bool(value.isfinite().all())]
    if bad:  # a diverged run saved: loading it would turn every output it touches into NaN
        raise AdapterFileError(f"{file}: tensor{'s' if len(bad) > 1 else ''} {_listed(sorted(bad))} hold NaN or inf values")
    return tensors


def _listed(keys: list[str], limit: int = 5) -> str:
    return f"{keys[:limit]}{'...' if len(keys) > limit else ''}"


def read_json(file: Path) -> dict[str, Any]:
    try:
        content = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"adapter config {file} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise AdapterFileError(f"adapter config {file} must hold a JSON object, not {type(content).__name__}")
    return content


def read_adapter(path: str | os.PathLike,
                 model: nn.Module | None = None) -> tuple[AdapterConfig, dict[str, torch.Tensor], str | None]:
    """Read (config, `<module>.<tensor>` tensors, saved name) from either layout.

    A PEFT-format config targets the modules PEFT would pick in `model` (its target_modules rules); without a
    model, the modules the file holds tensors for (PEFT's trained biases stay absolute, as `absolute_bias`)."""
    path = Path(path)
    recover(path)  # a save killed between its renames left the old adapter beside the path
    if (path / PEFTKIT_CONFIG).is_file():
        meta = read_json(path / PEFTKIT_CONFIG)
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
            config, tensors = hf_peft.from_peft(read_json(path / hf_peft.CONFIG_FILE), raw, model)
        except (TypeError, ValueError) as err:  # TypeError: a field of the wrong JSON type
            raise AdapterFileError(f"{path / hf_peft.CONFIG_FILE}: {err}") from None
        return config, tensors, None
    raise AdapterFileError(f"{path} holds no adapter: expected {PEFTKIT_CONFIG} or {hf_peft.CONFIG_FILE}")


def fill_adapter(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 strict: bool = True) -> None:
    """Copy the tensors read from `path` into attached adapter `name` (the file-fit rules of `peftkit.load`),
    against the bare base (bias changes, base tensors); every tensor is checked before any is copied."""
    with unfolded(model, get_registry(model), [""]):
        _copy_into(model, name, tensors, Path(path), strict)


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
        if current is None:  # reported with the other misfits
            continue
        if saved.shape != current.shape:
            raise _shape_error(path, key, saved, current)
        if not torch.equal(saved, current.detach().to("cpu", saved.dtype)):  # compare at the file's precision
            raise AdapterFileError(
                f"{path} carries base weight {key} (PEFT saves embedding layers that are targeted or resized, and task "
                f"heads) and it differs from this model's; peftkit never replaces base weights: load the base it was "
                f"trained on"
            )


def _misfit(path: Path, what: str, strict: bool) -> None:
    """A file that does not fit the adapter: an error, or with strict=False (PEFT's leniency) a warning."""
    if strict:
        raise AdapterFileError(f"{path} does not fit this model: {what} (strict=False loads the rest, as PEFT does)")
    warnings.warn(f"{path} does not fit this model: {what}; loading the rest (strict=False)", stacklevel=3)


def _by_host(tensors: dict[str, torch.Tensor], hosts: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """(host -> {key below it: tensor}, keys under no host). Every file tensor goes under its deepest host: a file may
    hold tensors the fresh delta lacks (a selective mask's indices), and a head copy must not receive its child's
    LoRA keys."""
    owned: dict[str, dict[str, torch.Tensor]] = {host: {} for host in hosts}
    stray = []
    for key, value in tensors.items():
        owner = max((host for host in hosts if key.startswith(f"{host}.")), key=len, default=None)
        if owner is None:
            stray.append(key)
        else:
            owned[owner][key[len(owner) + 1:]] = value
    return owned, stray


def _fit_report(expected: dict[str, torch.Tensor], provided: dict[str, torch.Tensor], stray: list[str],
                empty: list[str], foreign: list[str]) -> str | None:
    """What keeps the file from fitting the adapter: missing and unexpected tensors, and the modules behind them."""
    missing, unexpected = sorted(expected.keys() - provided.keys()), sorted(provided.keys() - expected.keys())
    if not (missing or unexpected or foreign):
        return None
    outside = sorted({key.partition(hf_peft.COPY_KEY)[0] if hf_peft.COPY_KEY in key else key.rpartition(".")[0]
                      for key in stray})
    parts = [f"missing tensors {_listed(missing)}" if missing else "",
             f"targeted modules without any tensor {_listed(empty)}" if empty else "",
             f"unexpected tensors {_listed(unexpected)}" if unexpected else "",
             f"tensors for modules outside the adapter's targets {_listed(outside)}" if outside else "",
             f"tensors {_listed(foreign)} are neither part of the adapter nor weights of this model" if foreign else ""]
    return ", ".join(part for part in parts if part)


@torch.no_grad()
def _copy_into(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: Path, strict: bool = True) -> None:
    """Check every tensor first, then copy: a bad file must not leave a half-written adapter."""
    base = {k[len(hf_peft.BASE_MARK):]: v for k, v in tensors.items() if k.startswith(hf_peft.BASE_MARK)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(hf_peft.BASE_MARK)}
    owned, stray = _by_host(tensors, get_registry(model).hosts[name])
    expected: dict[str, torch.Tensor] = {}
    provided = {key: tensors[key] for key in stray}
    empty = []
    for host_name, _, delta in adapter_deltas(model, name):
        saved = owned[host_name]
        try:
            dense_form(delta, saved)  # pruned parameters saved sparse: dense again, their masks given to the delta
        except ValueError as err:
            raise AdapterFileError(f"{path}: module {host_name}: {err}") from None
        delta.prepare_load(saved)  # a delta whose shapes change in training (a pruned rank) takes the file's
        state = delta.state_dict(keep_vars=True)
        if state and not saved:
            empty.append(host_name)
        expected.update({f"{host_name}.{key}": param for key, param in state.items()})
        provided.update({f"{host_name}.{key}": value for key, value in saved.items()})
    foreign = sorted(base.keys() - model.state_dict().keys()) if base else []
    report = _fit_report(expected, provided, stray, empty, foreign)
    if report:
        _misfit(path, report, strict)
    loaded = {key: param for key, param in expected.items() if key in provided}
    for key, param in loaded.items():
        saved = provided[key]
        if saved.shape != param.shape:
            raise _shape_error(path, key, saved, param)
        if param.is_floating_point() and not saved.is_floating_point():  # copy_ would silently cast garbage
            raise AdapterFileError(f"{path}: tensor {key} has dtype {saved.dtype}; a floating-point tensor is needed")
    _check_base_tensors(model, base, path)
    for key, param in loaded.items():
        param.copy_(provided[key])
