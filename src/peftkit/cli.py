"""`peftkit` command line.

`peftkit train [CONFIG.yaml]` trains an adapter as the config says; without a config it runs the bundled
default (MiniLM-L6 + LoRA on BBC News). `peftkit eval` and `peftkit predict` use a trained adapter with its
config. Each subcommand is one `_add_<name>(commands)` function (`bench` in `bench.cli`; `serve` in `serve.cli`;
`inspect`, `convert` and `methods` in `cli_tools`; `merge` in `compose.cli`; `search` in `search.cli`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml


def _describe(trainer: Any) -> None:
    """What is about to train, printed before the first step."""
    from peftkit.train.tasks import num_rows

    config, data = trainer.config, trainer.data
    method = config.method
    fields = ", ".join(f"{k}={v}" for k, v in method.model_dump().items()
                       if k not in ("method", "exclude", "modules_to_save"))
    source = config.data.name or config.data.train
    n_test = f" / {num_rows(data.test)} test" if data.test is not None else ""
    n_eval = num_rows(data.eval) if data.eval is not None else 0
    labels = f", {len(data.labels)} labels: {', '.join(data.labels)}" if data.labels else ""
    print(f"{config.model.name} + {method.method}({fields}) on {source} "
          f"({num_rows(data.train)} train / {n_eval} eval{n_test} rows{labels})")
    total = sum(p.numel() for p in trainer.model.parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")


def _metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in sorted(metrics.items()))


def _results(result: Any, config: Any) -> list[str]:
    """The eval results of a run: before and after, the last epoch and the best one, and the test split."""
    lines = []
    if result.after is not None:
        metric = result.best["metric"] if result.best else "loss"
        before = f"{result.before[metric]:.3f}" if result.before else "-"
        chance = f"  (chance {1 / len(result.labels):.3f})" if metric == "accuracy" else ""
        lines.append(f"eval {metric} before: {before}  after: {result.after[metric]:.3f}{chance}")
    if result.last is not None:
        lines.append(f"last epoch {result.last['epoch']} (step {result.last['step']}): {_metrics(result.last['metrics'])}")
    if result.best is not None:
        kept = "; its weights were kept" if config.eval.restore_best else ""
        lines.append(f"best epoch {result.best['epoch']} (step {result.best['step']}) by eval {result.best['metric']}: "
                     f"{_metrics(result.best['metrics'])}{kept}")
    if result.test is not None:
        which = "the best epoch's" if config.eval.restore_best and result.best else "the last epoch's"
        lines.append(f"test ({which} weights, scored once): {_metrics(result.test)}")
    return lines


def set_overrides(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items (the value read as YAML) as dotted config keys."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """`--set KEY=VALUE` and `--no-progress`, as dotted config keys."""
    overrides = set_overrides(args.set)
    if args.no_progress:
        overrides["progress"] = False
    return overrides


def _load_config(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    """The config with its overrides; what the overrides changed besides (a method switch's dropped keys) is
    printed as a note."""
    from peftkit.train import load_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(args.config, overrides)
    for warning in caught:
        print(f"peftkit: note: {warning.message}", file=sys.stderr)
    return config


def _say(message: str) -> None:
    print(f"{message} ...", flush=True)


def _train(args: argparse.Namespace) -> int:
    from peftkit.train import Callback, run_training

    overrides = _overrides(args)
    for flag, key in _SHORTCUTS.items():
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    config = _load_config(args, overrides)

    class Describe(Callback):
        def on_train_begin(self, trainer: Any) -> None:
            _describe(trainer)

    result = run_training(config, resume=args.resume, callbacks=[Describe()], say=_say)
    print("\n".join(_results(result, config)))
    samples = result.steps * config.schedule.batch_size * config.schedule.grad_accum
    print(f"training time: {result.train_seconds:.1f} s for {result.steps} steps "
          f"({samples / max(result.train_seconds, 1e-9):.1f} samples/s, {torch.get_num_threads()} threads)"
          + ("; stopped early" if result.stopped_early else ""))
    print(f"metrics: {result.output_dir / 'metrics.jsonl'}; checkpoints: {result.output_dir / 'checkpoints'}")
    if result.adapter_dir is not None:
        what = "full fine-tuned model" if config.method.method == "full" else "adapter"
        print(f"{what} saved to {result.adapter_dir}")
    return 0


# Flags kept from the first `peftkit train`: each sets one config key.
_SHORTCUTS = {"epochs": "schedule.epochs", "batch_size": "schedule.batch_size", "lr": "optimizer.lr",
              "max_length": "data.max_length", "limit": "data.train_limit", "seed": "seed", "output": "output.dir"}


def _config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """CONFIG, --set and --no-progress: what train, eval and predict share."""
    parser.add_argument("config", nargs="?", help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set method.r=4 --set schedule.grad_accum=2; "
                             "--set method.method=ia3 switches method and drops the keys ia3 lacks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="train an adapter from a YAML config (default: MiniLM-L6 + LoRA on BBC News)",
        description="Train an adapter (or, with `method: full`, the whole model) as CONFIG.yaml says (see configs/). "
                    "Without CONFIG: MiniLM-L6 + LoRA (r=8, alpha=16 on query,value) on BBC News, saved under "
                    "runs/bbc-lora. `peftkit methods` lists the methods and the keys of the config's method: section.")
    _config_arguments(train, "training config (YAML); default: the bundled BBC News job")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last")
    train.add_argument("--output", help="output directory (metrics, checkpoints, adapter/)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--max-length", type=int)
    train.add_argument("--limit", type=int, help="use only this many training rows")
    train.add_argument("--seed", type=int)
    train.set_defaults(run=_train)


def _saved_arguments(parser: argparse.ArgumentParser) -> None:
    """What eval and predict share: the run's config (and --set, --no-progress) and its saved adapter."""
    _config_arguments(parser, "the training config the adapter was trained with; default: the bundled BBC News job")
    parser.add_argument("--adapter", required=True, metavar="DIR",
                        help="adapter directory (OUTPUT/adapter, a checkpoint, a PEFT directory, a full fine-tune)")


def _eval(args: argparse.Namespace) -> int:
    from peftkit.train.saved import evaluate_saved

    config = _load_config(args, _overrides(args))
    metrics, rows = evaluate_saved(config, args.adapter, args.split, progress=config.progress)
    print(json.dumps({"split": args.split, "rows": rows, **metrics}) if args.json
          else f"{args.split} ({rows} rows): {_metrics(metrics)}")
    return 0


def _add_eval(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval", help="score a trained adapter on the eval (or test) split of its training config",
        description="Load the adapter (or full fine-tune) in DIR onto CONFIG's model and report its metrics on "
                    "CONFIG's eval split (data.eval, data.eval_fraction or the bundled set's), or data.test.")
    _saved_arguments(evaluate)
    evaluate.add_argument("--split", choices=["eval", "test"], default="eval", help="default: eval")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(run=_eval)


def _predict(args: argparse.Namespace) -> int:
    from peftkit.bench.cache import write_atomically
    from peftkit.train.saved import predict_saved

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    config = _load_config(args, _overrides(args))
    records = predict_saved(config, args.adapter, args.input, args.max_new_tokens)
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if args.output is None:
        sys.stdout.write(lines)
    else:
        write_atomically(Path(args.output), lines)
        print(f"{len(records)} predictions written to {args.output}", file=sys.stderr)
    return 0


def _add_predict(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser(
        "predict", help="label texts or images, or answer prompts, with a trained adapter (JSON lines)",
        description="Load the adapter (or full fine-tune) in DIR onto CONFIG's model and run it on every input of "
                    "FILE (a .txt file with one input per line, or the text / prompt column of a .csv / .jsonl / "
                    ".json file; for classify-image an image, a folder of images, or a .txt file of image paths). "
                    "classify-text writes {text, label, probabilities}; classify-image {image, label, "
                    "probabilities}; causal-lm-chat {prompt, response} (greedy decoding). One JSON object per line.")
    _saved_arguments(predict)
    predict.add_argument("--input", required=True, metavar="FILE",
                         help="inputs: .txt, .csv, .jsonl or .json (images: an image, a folder, or a .txt of paths)")
    predict.add_argument("--output", metavar="FILE", help="write the JSON lines here (default: standard output)")
    predict.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit for chat (default 64)")
    predict.set_defaults(run=_predict)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (a config, a path, a file, a missing package), not a bug in peftkit: one line.
    ValueError covers peftkit's own (AdapterFileError, MergeError, TargetError, ...) and pydantic's."""
    from peftkit.core.registry import UnknownAdapterError
    from peftkit.methods import MaskNotSelectedError
    from peftkit.serve import ServeError

    return (ValueError, ImportError, FileNotFoundError, FileExistsError, PermissionError, MaskNotSelectedError,
            UnknownAdapterError, ServeError)


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
    from peftkit.compose.cli import add_merge
    from peftkit.search.cli import add_search
    from peftkit.serve.cli import add_serve

    parser = argparse.ArgumentParser(prog="peftkit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    _add_eval(commands)
    _add_predict(commands)
    add_bench(commands)
    add_serve(commands)
    add_inspect(commands)
    add_convert(commands)
    add_merge(commands)
    add_search(commands)
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
