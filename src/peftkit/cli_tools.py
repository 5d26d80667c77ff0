"""`peftkit inspect`, `peftkit convert` and `peftkit methods`: what a new user asks before and after training.

`inspect` reads only the adapter's files (no model), so it answers for any adapter directory in seconds;
`convert` needs the base model, since a PEFT layout depends on the modules' types (GPT-2's Conv1D, embeddings).
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
from pathlib import Path
from typing import Any

from .core import hf_peft
from .core.config import METHODS, AdapterConfig, TargetSpec
from .core.io import PEFTKIT_CONFIG, PEFTKIT_WEIGHTS, AdapterFileError, read_adapter
from .core.targets import ALL_LINEAR

_FORMATS = {"peftkit": (PEFTKIT_CONFIG, PEFTKIT_WEIGHTS), "peft": (hf_peft.CONFIG_FILE, hf_peft.WEIGHTS_FILE)}
_SHARED_FIELDS = frozenset(AdapterConfig.model_fields)  # targets, exclude, modules_to_save: shown on their own lines
_SHOWN_NAMES = 3


# --- inspect ------------------------------------------------------------------------------------------------------

def adapter_format(path: Path) -> str | None:
    """"peftkit" or "peft" by the config file present (peftkit's first, as `read_adapter` reads it), else None."""
    return next((name for name, (config, _) in _FORMATS.items() if (path / config).is_file()), None)


def _adapter_dir(path: str) -> Path:
    """A missing path is a FileNotFoundError (a typo), not 'holds no adapter'."""
    if not Path(path).exists():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    return Path(path)


def _named_by(name: str, targets: TargetSpec) -> bool:
    """Whether a module name is one the target spec names (as `core.targets` matches names; types never do)."""
    if isinstance(targets, list):
        return any(name == entry or name.endswith(f".{entry}") for entry in targets)
    try:
        return targets != ALL_LINEAR and re.fullmatch(targets, name) is not None
    except re.error:
        return False


def _host(key: str, targets: TargetSpec) -> str:
    """The module a `<module>.<tensor>` key belongs to. Tensor names may be dotted (a bottleneck's `down.weight`, a
    sparse diff's `weight.indices`), so without a model the deepest prefix the targets name wins; for specs that
    name no module ('all-linear', types) the key's last segment is the tensor."""
    prefixes = [key.rsplit(".", depth)[0] for depth in range(1, key.count(".") + 1)]
    return next((prefix for prefix in prefixes if _named_by(prefix, targets)), key.rpartition(".")[0])


def _method_fields(config: AdapterConfig) -> dict[str, Any]:
    """The method's own settings (rank, alpha, ...), leaving out empty patterns and unset options."""
    return {key: value for key, value in config.model_dump(mode="json").items()
            if key not in _SHARED_FIELDS and value not in ({}, [], None)}


def _peft_type(path: Path, fmt: str, config: AdapterConfig) -> str | None:
    if fmt == "peft":
        return json.loads((path / hf_peft.CONFIG_FILE).read_text()).get("peft_type")
    return getattr(type(config), "peft_type", None)


def _base_model(path: Path, fmt: str) -> str | None:
    if fmt != "peft":  # peftkit's files do not record the base
        return None
    return json.loads((path / hf_peft.CONFIG_FILE).read_text()).get("base_model_name_or_path")


def adapter_summary(path: Path) -> dict[str, Any]:
    """What an adapter directory holds, from its files alone (no model is loaded)."""
    config, tensors, name = read_adapter(path)
    fmt = adapter_format(path)
    own = {key: value for key, value in tensors.items() if not key.startswith(hf_peft.BASE_MARK)}
    hosts = list(dict.fromkeys(_host(key, config.targets) for key in own if hf_peft.COPY_KEY not in key))
    return {
        "path": str(path), "format": fmt, "name": name, "method": config.method,
        "peft_type": _peft_type(path, fmt, config), "config": _method_fields(config),
        "targets": {"count": len(hosts), "names": hosts},
        "modules_to_save": list(config.modules_to_save),
        # a sparse diff's indices are not parameters
        "trainable_parameters": sum(value.numel() for value in own.values() if value.is_floating_point()),
        "base_tensors_not_counted": len(tensors) - len(own),
        "dtypes": sorted({str(value.dtype).removeprefix("torch.") for value in own.values()}),
        "size_bytes": sum(file.stat().st_size for file in path.iterdir() if file.is_file()),
        "base_model": _base_model(path, fmt),
    }


def _size(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def _few(names: list[str]) -> str:
    more = len(names) - _SHOWN_NAMES
    return ", ".join(names[:_SHOWN_NAMES]) + (f", ... (+{more} more)" if more > 0 else "")


def summary_lines(info: dict[str, Any]) -> list[str]:
    """`adapter_summary` as the lines `peftkit inspect` prints."""
    config_file, weights_file = _FORMATS[info["format"]]
    peft = f"PEFT type {info['peft_type']}" if info["peft_type"] else "no Hugging Face PEFT equivalent"
    hosts = info["targets"]["names"] or [""]
    targets = "the whole model" if hosts == [""] else f"{len(hosts)} module{'s' * (len(hosts) != 1)}: {_few(hosts)}"
    base = f" (+ {info['base_tensors_not_counted']} base tensors saved beside it, not counted)" \
        if info["base_tensors_not_counted"] else ""
    return [f"format: {info['format']} ({config_file} + {weights_file})",
            f"name: {info['name'] or '-'}",
            f"method: {info['method']} ({peft})",
            f"config: {', '.join(f'{k}={v}' for k, v in info['config'].items()) or '-'}",
            f"targets: {targets}",
            f"modules_to_save: {', '.join(info['modules_to_save']) or '-'}",
            f"trainable parameters: {info['trainable_parameters']:,}{base}",
            f"dtypes: {', '.join(info['dtypes']) or '-'}",
            f"size on disk: {_size(info['size_bytes'])}",
            f"base model: {info['base_model'] or 'not recorded'}"]


def _inspect(args: argparse.Namespace) -> int:
    info = adapter_summary(_adapter_dir(args.dir))
    print(json.dumps(info, indent=2) if args.json else "\n".join(summary_lines(info)))
    return 0


def add_inspect(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect", help="show what an adapter directory holds (peftkit or Hugging Face PEFT format)",
        description="Show an adapter's format, method, settings, target modules, trainable parameters, dtypes, size "
                    "and base model, from its files alone: no model is loaded.")
    inspect.add_argument("dir", help="adapter directory")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead")
    inspect.set_defaults(run=_inspect)


# --- convert ------------------------------------------------------------------------------------------------------

def _build_model(name: str, num_labels: int | None) -> Any:
    """A bundled model by its `model.name` in training configs (or one added with `register_model`)."""
    from .train.tasks import MODELS

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}{_close(name, MODELS)}; known: {', '.join(MODELS)}")
    return MODELS[name].build(num_labels)[0]


def _convert(args: argparse.Namespace) -> int:
    from . import load, save

    source, output = _adapter_dir(args.dir), Path(args.output)
    if adapter_format(source) is None:
        raise AdapterFileError(f"{source} holds no adapter: expected {PEFTKIT_CONFIG} or {hf_peft.CONFIG_FILE}")
    if output.exists() and adapter_format(output) is None:  # a save replaces the whole directory
        raise FileExistsError(f"{output} exists and is not an adapter directory; refusing to replace it")
    model = _build_model(args.model, args.num_labels)
    name = load(model, source)  # strict: a file that does not fit the model is an error, not a half conversion
    save(model, output, name=name, format=args.to)
    print(f"{source} ({adapter_format(source)}) -> {output} ({args.to}), through {args.model}")
    return 0


def add_convert(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser(
        "convert", help="convert an adapter between peftkit's and Hugging Face PEFT's format",
        description="Load the adapter in DIR onto the base model (strictly: it must fit) and save it in the other "
                    "format. The base model is needed because the layout depends on the modules' types.")
    convert.add_argument("dir", help="adapter directory (either format)")
    convert.add_argument("--to", required=True, choices=list(_FORMATS), help="the format to write")
    convert.add_argument("--output", required=True, help="directory to write (replaced if it holds an adapter)")
    convert.add_argument("--model", required=True,
                         help="the base model the adapter was trained on: minilm, smollm2, efficientnet-lite0")
    convert.add_argument("--num-labels", type=int,
                         help="classifier labels (MiniLM, EfficientNet), when the adapter sits on a classifier")
    convert.set_defaults(run=_convert)


# --- methods ------------------------------------------------------------------------------------------------------

def _close(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _first_line(cls: type) -> str:
    return next(iter((cls.__doc__ or "").strip().splitlines()), "")


def method_fields(cls: type[AdapterConfig], shared: bool = False) -> list[tuple[str, str, str]]:
    """(field, default, description) of a method's config; the fields every method shares only with `shared`."""
    rows = []
    for key, field in cls.model_fields.items():
        if key in _SHARED_FIELDS and not shared:
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((key, default, field.description or ""))
    return rows


def _method_detail(name: str) -> list[str]:
    cls = METHODS[name]
    peft = getattr(cls, "peft_type", None)
    lines = [f"{name}: {_first_line(cls)}", f"config class: peftkit.{cls.__name__}; "
             + (f"Hugging Face PEFT type {peft}" if peft else "no Hugging Face PEFT equivalent"), "fields:"]
    width = max(len(key) for key, _, _ in method_fields(cls, shared=True))
    lines += [f"  {key:<{width}}  default {default}" + (f": {text}" if text else "")
              for key, default, text in method_fields(cls, shared=True)]
    return lines


def _method_listing() -> list[str]:
    lines = []
    for name in sorted(METHODS):
        fields = ", ".join(f"{key}={default}" for key, default, _ in method_fields(METHODS[name]))
        lines += [f"{name}: {_first_line(METHODS[name])}", f"    {fields or '(targets only)'}"]
    return lines + ["", "every method also takes targets (required), exclude and modules_to_save; "
                        "`peftkit methods NAME` describes each field",
                    "a training config may also say `method: full`: full fine-tuning, every base parameter trained "
                    "(no adapter, no other keys)"]


def _methods(args: argparse.Namespace) -> int:
    import peftkit.methods  # noqa: F401  (registers every method)

    if args.name is not None and args.name not in METHODS:
        raise ValueError(f"unknown method {args.name!r}{_close(args.name, METHODS)}; "
                         "`peftkit methods` lists them")
    print("\n".join(_method_listing() if args.name is None else _method_detail(args.name)))
    return 0


def add_methods(commands: argparse._SubParsersAction) -> None:
    methods = commands.add_parser(
        "methods", help="list the PEFT methods, their config fields and defaults",
        description="List every registered method with its config fields and defaults; with NAME, one method's "
                    "fields and what each does. These are the keys of a training config's `method:` section.")
    methods.add_argument("name", nargs="?", help="one method to describe, e.g. lora")
    methods.set_defaults(run=_methods)
