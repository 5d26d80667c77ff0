"""`peftkit bench`: the unified PEFT benchmark from the command line (parser and entry point)."""
from __future__ import annotations

import argparse
import shlex


def add_bench(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="benchmark PEFT methods x tasks under one protocol: tables, plots, a report",
        description="Run every registered PEFT method (or --methods) on the bundled tasks (or --tasks) under one "
                    "budget, and write OUTPUT/report.md, report.html, results.json and PNG plots. Results are cached "
                    "per (method, task, config, seed) under OUTPUT/cache: a rerun computes only new cells, and an "
                    "interrupted run resumes.")
    profile = bench.add_mutually_exclusive_group()
    profile.add_argument("--quick", dest="profile", action="store_const", const="quick",
                         help="a few minutes on 2 CPU cores: MiniLM on a BBC News subset, representative methods and "
                              "the reference rows, 1 seed, each method's first lr (the default)")
    profile.add_argument("--standard", dest="profile", action="store_const", const="standard",
                         help="about an hour on 2 CPU cores: every registered method on a larger BBC News subset, "
                              "1 seed, the first two lrs of each method's best-first list")
    profile.add_argument("--full", dest="profile", action="store_const", const="full",
                         help="every registered method on every task, 3 seeds, the lr sweep (hours on a CPU)")
    bench.add_argument("--methods", nargs="+", metavar="METHOD", help="rows to run (registry names, full-finetune, "
                       "linear-probe); default: the profile's")
    bench.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to run (bbc-news, chatterbot, "
                       "fashion-mnist, fashion-mnist-vit, or a --task-file's name); default: the profile's")
    bench.add_argument("--task-file", action="append", default=[], metavar="YAML",
                       help="add a task from local data (see peftkit.bench.tasks.load_task_file); repeatable")
    bench.add_argument("--seeds", type=int, help="seeds per cell (default: the profile's)")
    bench.add_argument("--lrs", type=int, metavar="N", help="try (up to) the first N of each method's best-first "
                       "learning rates (default: the profile's: 1 quick, 2 standard, all full)")
    bench.add_argument("--metric", help="the metric that picks the lr and is plotted (default: the task's)")
    bench.add_argument("--output", default="runs/bench", help="report and cache folder (default: runs/bench)")
    bench.add_argument("--compare-peft", action="store_true",
                       help="also run Hugging Face PEFT's version of each method it has, side by side")
    bench.add_argument("--budget", action="append", default=[], metavar="FIELD=VALUE",
                       help="replace a field of the profile's budget on every task, e.g. --budget steps=8 --budget "
                            "test_rows=100 (fields: steps, batch_size, train_rows, val_rows, test_rows, max_length, "
                            "image_size; rows: a number or 'all'); repeatable. A cheaper run, not the profile's")
    bench.set_defaults(run=run, profile="quick")


def budget_changes(pairs: list[str]) -> dict[str, int | None]:
    """`["steps=8", "train_rows=all"]` -> {"steps": 8, "train_rows": None}; a malformed pair is a ValueError."""
    changes: dict[str, int | None] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not (value.isdigit() or value == "all"):
            raise ValueError(f"--budget takes FIELD=NUMBER (or FIELD=all for rows), got {pair!r}")
        changes[key] = None if value == "all" else int(value)
    return changes


def _command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces this run (printed in the report)."""
    words = ["peftkit", "bench", f"--{args.profile}"]
    for flag, values in (("--methods", args.methods), ("--tasks", args.tasks)):
        if values:
            words += [flag, *values]
    for path in args.task_file:
        words += ["--task-file", path]
    for flag, value in (("--seeds", args.seeds), ("--lrs", args.lrs), ("--metric", args.metric)):
        if value is not None:
            words += [flag, str(value)]
    for pair in args.budget:
        words += ["--budget", pair]
    words += ["--output", args.output] + (["--compare-peft"] if args.compare_peft else [])
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    from .protocol import plan_bench, run_bench
    from .report import markdown_table
    from .tasks import load_task_file

    plan = plan_bench(args.profile, tasks=args.tasks, methods=args.methods, seeds=args.seeds, output=args.output,
                      metric=args.metric, compare_peft=args.compare_peft,
                      extra_tasks=[load_task_file(path) for path in args.task_file], command=_command_line(args),
                      budget=budget_changes(args.budget), lrs=args.lrs)
    print(f"{plan.command}\n{plan.describe()}; tasks: {', '.join(t.name for t in plan.tasks)}; "
          f"rows: {', '.join(plan.methods)}", flush=True)
    reports, paths = run_bench(plan)
    for task in reports:
        print(f"\n{task.name}: {task.title}\nbudget: {task.budget}\n\n{markdown_table(task)}")
    plots = ", ".join(p.name for p in paths["plots"]) or "none (no row finished)"
    print(f"\nreport: {paths['markdown']} (and {paths['html'].name}, {paths['json'].name}); plots: {plots}")
    return 0

