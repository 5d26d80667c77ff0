"""`peftkit merge`: load saved adapters onto their base model, merge them (`merge_adapters`), save the result."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import get_args

from ..cli_tools import _adapter_dir, _build_model, adapter_format
from .merge import MergeMethod, MergeOptions, merge_adapters


def parse_adapter(spec: str) -> tuple[str | None, Path, float]:
    """`[NAME=]DIR[:WEIGHT]` -> (name or None, directory, weight; default 1). The weight is the text after the last
    ':' when it reads as a number."""
    name, sep, rest = spec.partition("=")
    if not sep:
        name, rest = None, spec
    elif not name:
        raise ValueError(f"--adapter {spec!r}: the name before '=' is empty")
    path, value = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon:
        try:
            path, value = head, float(tail)
        except ValueError:  # a ':' inside the directory name
            pass
    if not math.isfinite(value):
        raise ValueError(f"--adapter {spec!r}: the weight must be a finite number")
    return name, _adapter_dir(path), value


def _options(args: argparse.Namespace) -> dict[str, object]:
    given = {"rank": args.rank, "density": args.density, "seed": args.seed, "sign_method": args.sign_method,
             "store": args.store}
    return {key: value for key, value in given.items() if value is not None}


def _merge(args: argparse.Namespace) -> int:
    from .. import adapters, load, save

    output = Path(args.output)
    if output.exists() and adapter_format(output) is None:  # a save replaces the whole directory
        raise FileExistsError(f"{output} exists and is not an adapter directory; refusing to replace it")
    specs = [(name or path.name, path, weight) for name, path, weight in map(parse_adapter, args.adapter)]
    names = [name for name, _, _ in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # checked before the model loads, as a bad option is
        raise ValueError(f"--adapter entries share the name {', '.join(map(repr, repeated))} (a directory's name "
                         "unless one is given): name them apart, e.g. --adapter a=DIR:0.5")
    MergeOptions(method=args.method, **_options(args))
    model = _build_model(args.model, args.num_labels)
    weights = {load(model, path, name=name, activate=False): weight for name, path, weight in specs}
    merge_adapters(model, weights, method=args.method, new_name=args.name, activate=False, **_options(args))
    save(model, output, name=args.name, format=args.format)
    config = adapters(model)[args.name]
    listed = ", ".join(f"{name} x {weight:g}" for name, weight in weights.items())
    print(f"{listed} -> {args.method} -> {config.method} adapter {args.name!r} on {len(config.targets)} modules, "
          f"saved to {output} ({args.format})")
    return 0


def add_merge(commands: argparse._SubParsersAction) -> None:
    merge = commands.add_parser(
        "merge", help="merge saved adapters into one (linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune)",
        description="Load each adapter onto the base model, merge them with their weights by METHOD and save the merged "
                    "adapter. LoRA-family adapters merge with each other, (IA)3 with (IA)3, selective with selective; "
                    "docs/merging-adapters.md gives each method's formula.")
    merge.add_argument("--model", required=True,
                       help="the base model the adapters were trained on: minilm, smollm2, efficientnet-lite0")
    merge.add_argument("--num-labels", type=int,
                       help="classifier labels (MiniLM, EfficientNet), when the adapters sit on a classifier")
    merge.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR[:WEIGHT]",
                       help="an adapter directory and its weight (default 1); repeat for each adapter")
    merge.add_argument("--method", choices=get_args(MergeMethod), default="linear", help="default: linear")
    merge.add_argument("--rank", type=int, help="rank of a LoRA result (svd; ties, dare_*, magnitude_prune on LoRAs)")
    merge.add_argument("--density", type=float, help="share of each task vector kept (ties, dare_*, magnitude_prune)")
    merge.add_argument("--seed", type=int, help="DARE's random masks (default 0)")
    merge.add_argument("--sign-method", choices=["total", "frequency"], help="TIES' sign election (default total)")
    merge.add_argument("--store", choices=["lora", "dense", "sparse"], help="the form of a dense merge's result")
    merge.add_argument("--name", default="merged", help="the merged adapter's name (default merged)")
    merge.add_argument("--format", choices=["peftkit", "peft"], default="peftkit", help="file format (default peftkit)")
    merge.add_argument("--output", required=True, help="directory to write (replaced if it holds an adapter)")
    merge.set_defaults(run=_merge)
