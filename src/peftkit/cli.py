"""`peftkit` command line.

`peftkit train [CONFIG.yaml]` trains an adapter as the config says; without a config it runs the bundled
default (MiniLM-L6 + LoRA on BBC News). Each subcommand is one `_add_<name>(commands)` function (`bench` in
`bench.cli`; `inspect`, `convert` and `methods` in `cli_tools`).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import yaml


def _describe(trainer: Any) -> None:
    """What is about to train, printed before the first step."""
    import peftkit
    from peftkit.train.tasks import num_rows

    config, data = trainer.config, trainer.data
    method = config.method
    fields = ", ".join(f"{k}={v}" for k, v in method.model_dump().items() if k not in ("exclude", "modules_to_save"))
    source = config.data.name or config.data.train
    n_eval = num_rows(data.eval) if data.eval is not None else 0
    labels = f", {len(data.labels)} labels: {', '.join(data.labels)}" if data.labels else ""
    print(f"{config.model.name} + {method.method}({fields}) on {source} "
          f"({num_rows(data.train)} train / {n_eval} eval rows{labels})")
    stats = peftkit.summary(trainer.model)
    print(f"trainable parameters: {stats.trainable:,} of {stats.total:,} ({100 * stats.trainable / stats.total:.2f}%)")


def _train(args: argparse.Namespace) -> int:
    from peftkit.train import Callback, load_config, run_training

    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    for flag, key in _SHORTCUTS.items():
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.no_progress:
        overrides["progress"] = False
    config = load_config(args.config, overrides)

    class Describe(Callback):
        def on_train_begin(self, trainer: Any) -> None:
            _describe(trainer)

    result = run_training(config, resume=args.resume, callbacks=[Describe()])
    if result.after is not None:
        metric = result.best["metric"] if result.best else "loss"
        before = f"{result.before[metric]:.3f}" if result.before else "-"
        chance = f"  (chance {1 / len(result.labels):.3f})" if metric == "accuracy" else ""
        print(f"eval {metric} before: {before}  after: {result.after[metric]:.3f}{chance}")
    samples = result.steps * config.schedule.batch_size * config.schedule.grad_accum
    print(f"training time: {result.train_seconds:.1f} s for {result.steps} steps "
          f"({samples / max(result.train_seconds, 1e-9):.1f} samples/s, {torch.get_num_threads()} threads)"
          + ("; stopped early" if result.stopped_early else ""))
    print(f"metrics: {result.output_dir / 'metrics.jsonl'}; checkpoints: {result.output_dir / 'checkpoints'}")
    print(f"adapter saved to {result.adapter_dir}")
    return 0


# Flags kept from the first `peftkit train`: each sets one config key.
_SHORTCUTS = {"epochs": "schedule.epochs", "batch_size": "schedule.batch_size", "lr": "optimizer.lr",
              "max_length": "data.max_length", "limit": "data.train_limit", "seed": "seed", "output": "output.dir"}


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="train an adapter from a YAML config (default: MiniLM-L6 + LoRA on BBC News)",
        description="Train an adapter as CONFIG.yaml says (see configs/). Without CONFIG: MiniLM-L6 + LoRA "
                    "(r=8, alpha=16 on query,value) on BBC News, saved under runs/bbc-lora. `peftkit methods` lists "
                    "the methods and the keys of the config's method: section.")
    train.add_argument("config", nargs="?", help="training config (YAML); default: the bundled BBC News job")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set method.r=4 --set schedule.grad_accum=2")
    train.add_argument("--output", help="output directory (metrics, checkpoints, adapter/)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--max-length", type=int)
    train.add_argument("--limit", type=int, help="use only this many training rows")
    train.add_argument("--seed", type=int)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (a config, a path, a file, a missing package), not a bug in peftkit: one line.
    ValueError covers peftkit's own (AdapterFileError, MergeError, TargetError, ...) and pydantic's."""
    from peftkit.core.registry import UnknownAdapterError
    from peftkit.methods import MaskNotSelectedError

    return (ValueError, ImportError, FileNotFoundError, FileExistsError, PermissionError, MaskNotSelectedError,
            UnknownAdapterError)


def _one_line(err: BaseException) -> str:
    """The error as one line: pydantic's report spans lines and links its docs, so each bad field becomes
    `path: message`; any other multi-line message is joined."""
    from pydantic import ValidationError

    from peftkit.core.config import validation_message

    if isinstance(err, ValidationError):
        return validation_message(err)
    lines = [line.strip() for line in str(err).splitlines()]
    return "; ".join(line for line in lines if line and not line.startswith("For further information visit"))


def main(argv: list[str] | None = None) -> int:
    from peftkit.bench.cli import add_bench
    from peftkit.cli_tools import add_convert, add_inspect, add_methods

    parser = argparse.ArgumentParser(prog="peftkit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    add_bench(commands)
    add_inspect(commands)
    add_convert(commands)
    add_methods(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except _user_errors() as err:
        if os.environ.get("PEFTKIT_DEBUG", "") not in ("", "0"):  # the traceback, for a report
            raise
        print(f"peftkit: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `peftkit methods | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
