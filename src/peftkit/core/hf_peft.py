"""Translation to and from Hugging Face PEFT's adapter layout.

PEFT wraps the model, so its keys carry a `base_model.model.` prefix; weight-delta tensors
end in `.weight` (an Embedding's LoRA factors are `lora_embedding_A/B`), and trainable
module copies (`modules_to_save`) are saved under the module's own parameter names. Each
method's config translates its own fields and tensor names (`to_peft`, `from_peft`,
`peft_tensor_name`, `split_peft_key`); this module does the shared key handling.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import METHODS, AdapterConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
COPY_KEY = ".module."  # a ModuleCopy keeps the copied module's parameters under `module.`


def _split_copy_key(key: str, copied: list[str]) -> tuple[str, str] | None:
    """('classifier', 'weight') for 'classifier.weight' when 'classifier' is a copied module."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        if any(module == m or module.endswith(f".{m}") for m in copied):
            return module, ".".join(parts[i:])
    return None


def to_peft(model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(adapter_config.json dict, adapter_model.safetensors dict) for one adapter's saved tensors."""
    if not hasattr(config, "to_peft"):
        raise ValueError(f"method {config.method!r} has no Hugging Face PEFT equivalent; save it in peftkit format")
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if COPY_KEY in key:
            host_name, _, param = key.partition(COPY_KEY)
            out[f"{PREFIX}{host_name}.{param}"] = value
        else:
            host_name, _, tensor_name = key.rpartition(".")
            out[f"{PREFIX}{host_name}.{config.peft_tensor_name(tensor_name, model.get_submodule(host_name))}"] = value
    peft_config = config.to_peft()
    peft_config["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return peft_config, out


def from_peft(peft_config: dict[str, Any], raw: dict[str, torch.Tensor]) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Our config and `<module>.<tensor>` tensors from a PEFT adapter directory's contents."""
    by_type = {getattr(cls, "peft_type", None): cls for cls in METHODS.values()}
    peft_type = peft_config.get("peft_type")
    if peft_type not in by_type:
        known = ", ".join(sorted(t for t in by_type if t))
        raise ValueError(f"PEFT adapter type {peft_type!r} is not supported here (supported: {known})")
    cls = by_type[peft_type]
    stripped: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"tensor {key!r} lacks PEFT's '{PREFIX}' prefix")
        stripped[key[len(PREFIX):]] = value
    method_keys = {k for k in stripped if cls.is_peft_tensor(k)}
    # PEFT lists task-type defaults ("classifier", "score") in modules_to_save even when absent: keep the saved ones.
    listed = list(dict.fromkeys(peft_config.get("modules_to_save") or []))
    copied = [m for m in listed if any(_split_copy_key(k, [m]) for k in stripped.keys() - method_keys)]
    tensors: dict[str, torch.Tensor] = {}
    for key, value in stripped.items():
        if key in method_keys:
            host_name, tensor_name = cls.split_peft_key(key)
            tensors[f"{host_name}.{tensor_name}"] = value
            continue
        split = _split_copy_key(key, copied)
        if split is None:
            raise ValueError(f"tensor {PREFIX}{key} is neither a {peft_type} tensor nor part of modules_to_save")
        tensors[f"{split[0]}{COPY_KEY}{split[1]}"] = value
    return cls.from_peft(peft_config, modules_to_save=copied), tensors
