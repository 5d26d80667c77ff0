"""Translation to and from Hugging Face PEFT's adapter layout.

PEFT wraps the model, so its keys carry a `base_model.model.` prefix; weight-delta tensors
end in `.weight` (an Embedding's LoRA factors are `lora_embedding_A/B`), and trainable
module copies (`modules_to_save`) are saved under the module's own parameter names. Each
method's config translates its own fields and tensor names (`to_peft`, `from_peft`,
`peft_tensor_name`, `split_peft_key`, and where the layouts differ beyond names, `pack_peft` /
`unpack_peft`; tensors shared by all layers: `peft_shared_tensors` / `check_peft_shared`); this
module does the shared key handling. A PEFT type may map to several configs told apart by flags
(`peft_flags`: LORA with use_dora is DoRA).

PEFT may also save base weights beside the adapter (`save_embedding_layers`: the embedding
layers when they are targeted or resized, as `<module>.base_layer.weight` or `<module>.weight`).
We never replace base weights; they come back under `BASE_MARK` and loading checks that they
equal the model's own.

Given the model, loading picks the modules as PEFT does (`peft_targets`: its target_modules,
exclude_modules, layers_to_transform / layers_pattern and modules_to_save rules), not the modules
the file happens to hold tensors for: peftkit.load then names tensors outside them and targeted modules
without tensors. Without a model (`read_adapter`), the file's tensors are all there is to go by.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import nn

from .config import METHODS, AdapterConfig
from .hosts import Conv1D
from .targets import ALL_LINEAR, module_names, uses_types

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."  # tensors on PEFT's tuner itself, shared by all layers (VeRA's vera_A, vera_B)
COPY_KEY = ".module."  # a ModuleCopy keeps the copied module's parameters under `module.`
BASE_MARK = "base:"  # a base-model tensor PEFT saved; ':' cannot clash with our dotted keys in practice
_BASE_LAYER = re.compile(r"\.base_layer\.(?=[^.]+$)")  # PEFT's wrapper segment before the base's own parameter
# bias="all" also saves a head copy's wrapper internals: the base head's bias (`original_module`), and the copy's
# bias under `modules_to_save` (PEFT ignores that one on load: the copy's own key holds it)
_ORIGINAL_MODULE = re.compile(r"\.original_module\.(?=[^.]+$)")
_WRAPPED_COPY = re.compile(r".*\.modules_to_save\.[^.]+")
PEFT_RAW = "peft:"  # a `pack_peft` key already in PEFT's naming (a trained bias): written as it is
# Heads PEFT's task model classes add to modules_to_save (PeftModelForSequenceClassification etc.); it then
# expects their tensors in the file, matching module names by plain suffix (`_set_trainable`)
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
_SEQ_CLS_HEAD_ATTRS = ("score", "classifier")  # PEFT's SEQ_CLS_HEAD_NAMES: "all-linear" leaves the first one found


class PeftKeys:
    """Mixin for a config with a PEFT equivalent: its tensor keys and the PEFT options it refuses.

    `_PEFT_KEY` fully matches a PEFT tensor key (prefix stripped) with groups (module, tensor);
    our tensor name is `_PEFT_TENSOR_PREFIX` + the tensor group.
    """

    peft_type: ClassVar[str]
    _PEFT_KEY: ClassVar[re.Pattern]
    _PEFT_TENSOR_PREFIX: ClassVar[str] = ""
    _PEFT_UNSUPPORTED: ClassVar[tuple[str, ...]] = ()  # options that change the math: refuse, never ignore

    @classmethod
    def is_peft_tensor(cls, key: str) -> bool:
        return cls._PEFT_KEY.fullmatch(key) is not None

    @classmethod
    def split_peft_key(cls, key: str) -> tuple[str, str]:
        match = cls._PEFT_KEY.fullmatch(key)
        return match[1], cls._PEFT_TENSOR_PREFIX + match[2]

    @classmethod
    def check_peft_options(cls, peft: dict[str, Any]) -> None:
        """Raise for a PEFT option this method does not implement (so no output is quietly wrong)."""
        for option in cls._PEFT_UNSUPPORTED:
            if peft.get(option):
                raise ValueError(f"PEFT {cls.peft_type} option {option}={peft[option]!r} is not supported by peftkit")
        modes = getattr(cls, "peft_bias_modes", ("none",))
        if peft.get("bias", "none") not in modes:
            raise ValueError(f"PEFT {cls.peft_type} option bias={peft['bias']!r} is not supported (only {', '.join(modes)})")


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
    refusal = config.peft_refusal() if hasattr(config, "peft_refusal") else None  # an option PEFT cannot hold
    if refusal is not None:
        raise ValueError(f"this {config.method} adapter has no Hugging Face PEFT equivalent: {refusal}")
    extra: dict[str, Any] = {}
    if hasattr(config, "pack_peft"):  # a layout that differs beyond names (AdaLoRA: kept triplets + rank_pattern)
        extra, tensors = config.pack_peft(tensors, model)
    out: dict[str, torch.Tensor] = {}
    prefix = getattr(config, "peft_prefix", PREFIX)  # prompt learning keeps its task heads under `base_model.`
    for key, value in tensors.items():
        if key.startswith(PEFT_RAW):
            out[prefix + key[len(PEFT_RAW):]] = value
        elif COPY_KEY in key:
            host_name, _, param = key.partition(COPY_KEY)
            out[f"{prefix}{host_name}.{param}"] = value
        else:
            host_name, _, tensor_name = key.rpartition(".")
            peft_name = config.peft_tensor_name(tensor_name, model.get_submodule(host_name))
            out[f"{prefix}{host_name}.{peft_name}" if host_name else peft_name] = value  # no host: a whole-model tensor
    peft_config = {**config.to_peft(), **extra}
    if getattr(config, "peft_needs_task_type", False):  # PEFT picks the model class that inserts prompts by task
        peft_config["task_type"] = peft_task_type(model)
        out.update(_task_head_tensors(model, peft_config["task_type"], tensors, prefix))
    hosts = list(dict.fromkeys(key.rpartition(".")[0] for key in tensors
                               if COPY_KEY not in key and not key.startswith(PEFT_RAW)))
    if hasattr(config, "peft_shared_tensors"):
        shared = config.peft_shared_tensors([model.get_submodule(h) for h in hosts])
        out.update({SHARED_PREFIX + key: value for key, value in shared.items()})
    # PEFT expands all-linear by its own rules, knows no "type:" entries, and some PEFT methods lack exclude_modules:
    # pin the modules we chose, as PEFT pins its own
    if (peft_config.get("target_modules") == ALL_LINEAR or uses_types(config.targets) or uses_types(config.exclude)
            or (config.exclude and "exclude_modules" not in peft_config)):
        peft_config["target_modules"] = hosts
        if "exclude_modules" in peft_config:  # already applied to `hosts`
            peft_config["exclude_modules"] = None
    if "fan_in_fan_out" in peft_config:  # PEFT wants it True on GPT-2's Conv1D (else it warns and patches the config)
        peft_config["fan_in_fan_out"] = Conv1D is not None and any(isinstance(model.get_submodule(h), Conv1D) for h in hosts)
    peft_config["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return peft_config, out


_PEFT_TASKS = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM",
               "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def _task_head_tensors(model: nn.Module, task_type: str, tensors: dict[str, torch.Tensor],
                       prefix: str) -> dict[str, torch.Tensor]:
    """The base heads PEFT's task model will wrap as modules_to_save and then expect in the file
    (`KeyError: 'base_model.classifier.weight'` otherwise): saved as they are, so PEFT's copy is the base head.
    Heads the adapter copies itself are saved already; loading here checks the others equal the model's."""
    copied = {key.partition(COPY_KEY)[0] for key in tensors if COPY_KEY in key}
    heads = [n for n in module_names(model) if n.endswith(_TASK_HEADS.get(task_type, ())) and n not in copied]
    heads = [n for n in heads if not any(n.startswith(f"{h}.") for h in heads)]
    return {f"{prefix}{head}.{key}": value.detach().contiguous().cpu() for head in heads
            for key, value in model.get_submodule(head).state_dict().items() if ".peftkit." not in f".{key}."}


def peft_task_type(model: nn.Module) -> str:
    """PEFT's task_type for a transformers model, from its class name (a bare backbone: feature extraction)."""
    name = type(model).__name__
    return next((task for suffix, task in _PEFT_TASKS.items() if name.endswith(suffix)), "FEATURE_EXTRACTION")


def _peft_class(peft_config: dict[str, Any]) -> type[AdapterConfig]:
    """The config class for a PEFT adapter: same peft_type, all its `peft_flags` set; the most specific wins."""
    peft_type = peft_config.get("peft_type")
    matches = [cls for cls in METHODS.values()
               if isinstance(peft_type, str) and getattr(cls, "peft_type", None) == peft_type
               and all(peft_config.get(flag) for flag in getattr(cls, "peft_flags", ()))]
    if not matches:
        known = ", ".join(sorted({getattr(cls, "peft_type", None) for cls in METHODS.values()} - {None}))
        raise ValueError(f"PEFT adapter type {peft_type!r} is not supported here (supported: {known})")
    return max(matches, key=lambda cls: len(getattr(cls, "peft_flags", ())))


def from_peft(peft_config: dict[str, Any], raw: dict[str, torch.Tensor],
              model: nn.Module | None = None) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Our config and `<module>.<tensor>` tensors (base weights under `BASE_MARK`) from a PEFT adapter's files.

    With `model`, the config targets the modules PEFT would pick in it (`peft_targets`); without, the modules
    the file holds tensors for."""
    cls = _peft_class(peft_config)
    stripped: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    prefix = getattr(cls, "peft_prefix", PREFIX)
    for key, value in raw.items():
        if key.startswith(prefix) or ("." not in key and cls.is_peft_tensor(key)):  # prompt learning: `prompt_embeddings`
            stripped[key.removeprefix(prefix)] = value
        elif key.startswith(SHARED_PREFIX) and hasattr(cls, "check_peft_shared"):
            shared[key[len(SHARED_PREFIX):]] = value
        else:
            raise ValueError(f"tensor {key!r} lacks PEFT's '{prefix}' prefix")
    stripped = {k: v for k, v in stripped.items() if not _WRAPPED_COPY.fullmatch(k)}
    method_keys = {k for k in stripped if cls.is_peft_tensor(k)}
    # PEFT lists task-type defaults ("classifier", "score") in modules_to_save even when absent: keep the saved ones.
    listed = list(dict.fromkeys(peft_config.get("modules_to_save") or []))
    copied = [m for m in listed if any(_split_copy_key(k, [m]) for k in stripped.keys() - method_keys)]
    if model is not None and getattr(cls, "peft_module_targets", True):
        hosts = peft_targets(peft_config, model)
    else:  # no model to match in (or PEFT matches by its own rule, which the config reproduces): the file's modules
        hosts = list(dict.fromkeys(cls.split_peft_key(k)[0] for k in stripped if k in method_keys))
    # The config first: an unsupported option (DoRA) also brings tensors we don't know, and the option is the reason.
    pinned = {"target_modules": hosts, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}
    try:
        config = cls.from_peft({**peft_config, **pinned}, modules_to_save=copied)
    except KeyError as err:
        raise ValueError(f"the PEFT config lacks the required field {err.args[0]!r}") from None
    if shared:
        config.check_peft_shared(shared)
    trains_bias = peft_config.get("bias", "none") != "none"
    tensors: dict[str, torch.Tensor] = {}
    for key, value in stripped.items():
        plain = _ORIGINAL_MODULE.sub(".", _BASE_LAYER.sub(".", key))  # the base module's own parameter name
        if key in method_keys:
            host_name, tensor_name = cls.split_peft_key(key)
            tensors[f"{host_name}.{tensor_name}"] = value
        elif plain != key and _ORIGINAL_MODULE.search(key):  # a head copy's base (bias="all" saves it)
            tensors[BASE_MARK + plain] = value
        elif split := _split_copy_key(key, copied):
            tensors[f"{split[0]}{COPY_KEY}{split[1]}"] = value
        elif trains_bias and plain.endswith(".bias"):  # a bias PEFT trained: absolute values
            host_name, tensor_name = cls.split_peft_bias(plain)
            tensors[f"{host_name}.{tensor_name}"] = value
        else:
            tensors[BASE_MARK + plain] = value
    if hasattr(config, "unpack_peft"):  # the inverse of `pack_peft`
        tensors = config.unpack_peft(peft_config, tensors)
    return config, tensors


# --- PEFT's module matching (peft 0.21: BaseTuner.inject_adapter, check_target_module_exists) -------------------

def peft_targets(peft: dict[str, Any], model: nn.Module) -> list[str]:
    """The modules of `model` PEFT adapts for config `peft`, in model order; a named error when there are none."""
    spec = peft.get("target_modules")
    if not spec:
        raise ValueError("the PEFT config has no target_modules")
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        spec = _peft_all_linear(model, peft.get("task_type"))
    saved = [*(peft.get("modules_to_save") or []), *_TASK_HEADS.get(peft.get("task_type"), ())]
    hosts = [n for n in module_names(model)
             if not _peft_excluded(n, peft.get("exclude_modules"), saved) and _peft_targeted(n, spec, peft)]
    if not hosts:
        options = {k: peft.get(k) for k in ("exclude_modules", "layers_to_transform", "layers_pattern") if peft.get(k)}
        raise ValueError(f"target_modules {peft['target_modules']!r}{f' with {options}' if options else ''} match no "
                         f"module of this {type(model).__name__} (PEFT refuses such an adapter too)")
    return hosts


def _peft_excluded(name: str, exclude: str | list[str] | None, saved: list[str]) -> bool:
    """exclude_modules (a full-match regex, or exact names / dotted suffixes), and anything in modules_to_save."""
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return True
    if isinstance(exclude, list) and any(name == e or name.endswith(f".{e}") for e in exclude):
        return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in saved)


def _peft_targeted(name: str, spec: str | list[str], peft: dict[str, Any]) -> bool:
    """A regex must match the whole name; a list entry the exact name (kept whatever the layer), or a dotted
    suffix subject to layers_to_transform."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    if name in spec:
        return True
    if not any(name.endswith(f".{entry}") for entry in spec):
        return False
    layers = peft.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _peft_layer_index(name, peft.get("layers_pattern"))
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def _peft_layer_index(name: str, pattern: str | list[str] | None) -> int | None:
    """The first numbered segment after `layers_pattern` (any segment when it is empty), as PEFT reads it."""
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for entry in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){entry}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match["idx"]) if match else None


def _peft_all_linear(model: nn.Module, task_type: str | None) -> list[str]:
    """PEFT's "all-linear": every Linear / Conv1D but a transformers model's output head (a classifier's, for SEQ_CLS)."""
    from transformers import PreTrainedModel

    linear = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)
    modules = dict(model.named_modules())
    names = [n for n in module_names(model) if isinstance(modules[n], linear)]
    head = None
    if isinstance(model, PreTrainedModel):
        head = model.get_output_embeddings()
        if head is None and task_type == "SEQ_CLS":
            head = next((getattr(model, a) for a in _SEQ_CLS_HEAD_ATTRS if getattr(model, a, None) is not None), None)
    return [n for n in names if head is None or modules[n] is not head]
