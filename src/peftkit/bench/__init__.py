"""`peftkit bench`: every registered PEFT method × tasks under one protocol -> tables, plots, a report."""
from .methods import BENCH_METHODS, BenchMethod
from .protocol import PROFILES, BenchPlan, plan_bench, run_bench
from .tasks import (BENCH_TASKS, BenchConfigError, BenchTask, Budget, OutputDirError, UnknownMethodError,
                    UnknownMetricError, UnknownTaskError, load_task_file)

__all__ = ["BENCH_METHODS", "BENCH_TASKS", "PROFILES", "BenchConfigError", "BenchMethod", "BenchPlan", "BenchTask",
           "Budget", "OutputDirError", "UnknownMethodError", "UnknownMetricError", "UnknownTaskError",
           "load_task_file", "plan_bench", "run_bench"]
