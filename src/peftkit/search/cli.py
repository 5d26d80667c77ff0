"""`peftkit search`: the design search from the command line (parser and entry point)."""
from __future__ import annotations

import argparse
import re
import shlex
import sys

_COUNT = re.compile(r"(\d+(?:\.\d+)?)([kKmM]?)")


def parameter_count(text: str) -> int:
    """`50000`, `50_000`, `50k`, `1.5M` -> a whole number of parameters."""
    match = _COUNT.fullmatch(text.replace("_", ""))
    if match is None:
        raise argparse.ArgumentTypeError(f"takes a parameter count like 50000, 50k or 1.5M, got {text!r}")
    value = float(match[1]) * {"": 1, "k": 1e3, "m": 1e6}[match[2].lower()]
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number of parameters of at least 1, got {text!r}")
    return int(value)


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (written into pareto.md)."""
    words = ["peftkit", "search", args.config]
    for flag, value in (("--trials", args.trials), ("--budget", args.budget), ("--seed", args.seed)):
        if value is not None:
            words += [flag, str(value)]
    for item in args.set:
        words += ["--set", item]
    return shlex.join(words + ["--output", args.output])


def run(args: argparse.Namespace) -> int:
    from ..cli import set_overrides
    from ..models import require_extra
    from .report import markdown_table, summary
    from .study import run_search

    require_extra("optuna", "search")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its INFO lines repeat the [search] ones
    overrides = set_overrides(args.set)
    for flag in ("trials", "budget", "seed"):
        if getattr(args, flag) is not None:
            overrides[f"search.{flag}"] = getattr(args, flag)
    if any(key == "method" or key.startswith("method.") for key in overrides):
        raise ValueError("--set method...: each candidate's design replaces the config's method; the search: section "
                         "(--set search.KEY=VALUE) chooses what is searched")
    command = _command_line(args)
    print(command, flush=True)
    report = run_search(args.config, args.output, overrides, command,
                        say=lambda message: print(f"[search] {message}", flush=True))
    print("\n".join(["", *summary(report)]))
    if report.best is not None:
        print(f"\nPareto front:\n{markdown_table(report.pareto, report.metric_names)}")
    print("\n" + ", ".join(str(path) for path in report.paths.values()), file=sys.stderr)
    return 0


def add_search(commands: argparse._SubParsersAction) -> None:
    search = commands.add_parser(
        "search", help="search PEFT designs (a method per layer group, ranks, adapter sizes, prefix length) under a "
                       "trainable-parameter budget",
        description="Draw PEFT designs with Optuna's TPE: k layer groups (spindle, uniform, ... sizes), each with "
                    "none, LoRA (rank r), (IA)3 or a bottleneck adapter (width, placement), and a shared prefix. A "
                    "design over the budget is pruned before it trains; every other trains under CONFIG's schedule "
                    "on its training rows less a held-out validation split, and is scored on that split. OUTPUT gets "
                    "trials.csv / .json, pareto.md and pareto.png (trainable parameters against validation score), "
                    "and best.yaml, the config with the best design: `peftkit train OUTPUT/best.yaml`. The study is "
                    "kept in OUTPUT/study.db: the same command resumes a stopped search, a larger --trials extends "
                    "it. CONFIG's search: section sets the space (docs/hybrid.md, Design search).")
    search.add_argument("config", help="a training config (YAML): task, model, data, schedule...; its method: is "
                                       "replaced by each candidate, its search: section sets the space")
    search.add_argument("--trials", type=int, help="designs to train in all, a resumed search's included "
                                                   "(search.trials; default 20)")
    search.add_argument("--budget", type=parameter_count, metavar="PARAMS",
                        help="most trainable parameters a candidate may have, the task head included, e.g. 50000 or "
                             "50k (search.budget; default none)")
    search.add_argument("--seed", type=int, help="the sampler's seed (search.seed; default 0); training uses the "
                                                 "config's seed")
    search.add_argument("--output", default="runs/search", help="the study and its reports (default runs/search)")
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set schedule.max_steps=20 --set search.lora_r=[4,8]")
    search.set_defaults(run=run)
