"""Training memory and speed side by side (CPU, issue #21): full fine-tuning, LoRA, LoRA with activation
checkpointing, LoRA-FA, MeZO (on LoRA and on the full model) and inference alone, on MiniLM-L6 (BBC News) and
SmolLM2-135M (chatterbot), batch and length fixed.

Per contender and model, in a fresh process (`_memory.in_fresh_process`, so one cell's freed memory cannot hide
another's peak):
  peak       resident-set peak while stepping (VmHWM, reset once the model is built) above the resident set before
             the model was loaded (the interpreter, torch and the encoded data, alike in every cell); `process` is the
             whole process's peak. The inference cell runs what evaluation runs on the same batches, the forward and
             its per-row loss, under inference_mode, in eval mode: the inference peak MeZO is held to (target: MeZO
             ≤ 1.1× it). Training cells run in train mode (MiniLM's dropout on);
  step       median seconds of one optimizer step (forward, backward, update; MeZO: two forwards and three draws of
             its noise), after a warm-up step;
  quality    BBC accuracy (MiniLM) or chatterbot held-out answer loss (SmolLM2), before and after training for the
             same wall-clock budget (--budget seconds of steps).

Every training cell steps through peftkit's engine (`peftkit.train.engine.Engine`), as `peftkit train` does. A new
contender is a function that builds the model, registered with `@register(name)` (and an optimizer factory when it
is not AdamW); `--only` picks contenders.

    python benchmarks/bench_memory.py --budget 20 --json out.json
    python benchmarks/bench_memory.py --models minilm --only "LoRA" "MeZO (LoRA)" inference
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _memory import (by_contender, failed_row, in_fresh_process, release_freed_memory, report, reset_peak,
                     results_by_model, rss_bytes, verdict)
from bench_quantized import JOBS as QUANTIZED_JOBS, Job, _checkpointed, _data, _load, _quality, _tokenizer

SEED = 0
TARGET = 1.1  # MeZO's peak over the inference peak
LST_TARGET = 0.5  # LST's peak over LoRA's
FULL_LR = 3e-5
JOBS = {  # the quantized bench's models, tasks and LoRA targets; fewer rows, so a cell stays short
    "minilm": replace(QUANTIZED_JOBS["minilm"], batch=16, max_length=64, train_rows=320, eval_rows=200),
    "smollm2": replace(QUANTIZED_JOBS["smollm2"], batch=8, max_length=96, train_rows=320, eval_rows=64),
}

Builder = Callable[[Job], nn.Module]  # the model ready to train: adapter attached, or the base unfrozen
OptimizerFactory = Callable[[list[nn.Parameter], Job], torch.optim.Optimizer]


def adamw(params: list[nn.Parameter], job: Job) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0)


def full_adamw(params: list[nn.Parameter], job: Job) -> torch.optim.Optimizer:
    """AdamW at a full fine-tune's learning rate (the adapters' 1e-3 .. 2e-3 wrecks a whole model in a few steps)."""
    return torch.optim.AdamW(params, lr=FULL_LR, weight_decay=0.0)


@dataclass(frozen=True)
class Contender:
    build: Builder
    optimizer: OptimizerFactory | None  # None: no training, forwards under inference_mode only


CONTENDERS: dict[str, Contender] = {}


def register(name: str, optimizer: OptimizerFactory | None = adamw) -> Callable[[Builder], Builder]:
    """Add a contender: `build(job)` returns the model ready to train; `optimizer(params, job)` its optimizer."""
    def add(build: Builder) -> Builder:
        CONTENDERS[name] = Contender(build, optimizer)
        return build
    return add


def mezo(lr: dict[str, float]) -> OptimizerFactory:
    """MeZO at a learning rate per model (the paper's ε = 1e-3)."""
    from peftkit.train.mezo import MeZO

    return lambda params, job: MeZO(params, lr=lr[job.model], seed=SEED)


def _attached(job: Job, config: Any) -> nn.Module:
    import peftkit

    return peftkit.attach(_load(job), config)


def lora(job: Job) -> nn.Module:
    import peftkit

    return _attached(job, peftkit.LoRA(r=8, alpha=16, targets=job.targets, modules_to_save=job.head))


def full(job: Job) -> nn.Module:
    return _load(job).requires_grad_(True)


register("full fine-tuning", optimizer=full_adamw)(full)
register("LoRA")(lora)
register("LoRA + checkpointing")(lambda job: _checkpointed(lora(job)))


@register("LoRA-FA")
def lorafa(job: Job) -> nn.Module:
    import peftkit

    return _attached(job, peftkit.LoRAFA(r=8, alpha=16, targets=job.targets, modules_to_save=job.head))


@register("LST")
def lst(job: Job) -> nn.Module:
    import peftkit

    return _attached(job, peftkit.LST(reduction=8, modules_to_save=job.head))


# MeZO's learning rates: the largest that did not diverge on MiniLM + LoRA (1e-1 did; 3e-2 lowered the loss);
# the full model's as the paper's (1e-6 .. 1e-7 for full fine-tuning at ε = 1e-3), one step up for the short budget
register("MeZO (LoRA)", optimizer=mezo({"minilm": 3e-2, "smollm2": 1e-3}))(lora)
register("MeZO (full)", optimizer=mezo({"minilm": 1e-5, "smollm2": 1e-5}))(full)
register("inference", optimizer=None)(lora)


# ----------------------------------------------------------------------------- measuring (in the fresh process)


def measure(name: str, job: Job, budget: float, threads: int) -> dict[str, Any]:
    """One cell: build, reset the peak, step for `budget` seconds (at least two steps), then score."""
    from peftkit.train.engine import Engine, MicroBatch, Run, task_loss

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    task, data = _data(job, _tokenizer(job))
    release_freed_memory()
    before = rss_bytes()
    contender = CONTENDERS[name]
    model = contender.build(job)
    quality_before = _quality(model, task, data.eval)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = next(iter(data.train.values())).shape[0]
    order = torch.Generator().manual_seed(SEED)
    if contender.optimizer is None:
        model.eval()

        def step() -> None:  # what evaluation runs: the forward and its per-row loss
            with torch.inference_mode():
                task.row_stats(model, task.collate(data.train, torch.randperm(rows, generator=order)[:job.batch]))
    else:
        model.train()
        run = Run(model, None, contender.optimizer(params, job), None, total_steps=10**9)
        engine, loss = Engine(model), task_loss(task)

        def step() -> None:
            batch = task.collate(data.train, torch.randperm(rows, generator=order)[:job.batch])
            engine.step([(run, [MicroBatch(run, task.inputs(batch), batch, job.batch, loss)])])
    release_freed_memory()
    reset_peak()
    times, start = [], time.perf_counter()
    while len(times) < 2 or time.perf_counter() - start < budget:
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    return {"contender": name, "model": job.model, "batch": job.batch, "max_length": job.max_length,
            "peak_bytes": rss_bytes("VmHWM") - before, "process_peak_bytes": rss_bytes("VmHWM"),
            "step_s": statistics.median(times[1:]), "steps": len(times),
            "trainable": sum(p.numel() for p in params) if contender.optimizer is not None else 0,
            "metric": task.metric, "quality_before": quality_before, "quality": _quality(model, task, data.eval)}


# ----------------------------------------------------------------------------- driving and reporting


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | contender | trainable | peak MiB | × inference | process peak MiB | step s | steps | quality |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for model, rows in results_by_model(results).items():
        ref = by_contender(rows).get("inference")
        for r in rows:
            if "error" in r:
                lines.append(failed_row(r, 6))
                continue
            ratio = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}" if ref else "–"
            lines.append(f"| {model} | {r['contender']} | {r['trainable']:,} | {r['peak_bytes'] / 2**20:.0f} | {ratio} "
                         f"| {r['process_peak_bytes'] / 2**20:.0f} | {r['step_s']:.3f} | {r['steps']} "
                         f"| {r['metric']} {r['quality_before']:.3f} → {r['quality']:.3f} |")
    return "\n".join(lines)


def verdicts(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for model, rows in results_by_model(results).items():
        by = by_contender(rows)
        for name in [n for n in by if n.startswith("MeZO") and "inference" in by]:
            ratio = by[name]["peak_bytes"] / by["inference"]["peak_bytes"]
            out.append(f"{model}: {name} peak {ratio:.2f}× the inference peak (target ≤ {TARGET}): "
                       f"{verdict(ratio, TARGET)}")
        if "LST" in by and "LoRA" in by:
            ratio = by["LST"]["peak_bytes"] / by["LoRA"]["peak_bytes"]
            out.append(f"{model}: LST peak {ratio:.2f}× LoRA's (target ≤ {LST_TARGET}): {verdict(ratio, LST_TARGET)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of training steps per cell")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per cell (1 on a loaded machine)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: each model's)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (default: each model's)")
    parser.add_argument("--eval-rows", type=int, default=None, help="rows scored for quality (default: each model's)")
    parser.add_argument("--models", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--only", nargs="+", default=None, help=f"contenders to run (default: all: {', '.join(CONTENDERS)})")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        request = json.loads(args.worker)
        print(json.dumps(measure(request["contender"], Job(**request["job"]), request["budget"], request["threads"])))
        return 0
    unknown = sorted(set(args.only or []) - set(CONTENDERS))
    if unknown:
        parser.error(f"--only: unknown contenders {unknown}; registered: {list(CONTENDERS)}")
    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
           "threads": args.threads, "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(), "argv": sys.argv[1:]}
    results = []
    for model in args.models:
        job = replace(JOBS[model], batch=args.batch or JOBS[model].batch,
                      max_length=args.max_length or JOBS[model].max_length,
                      eval_rows=args.eval_rows or JOBS[model].eval_rows)
        for name in args.only or CONTENDERS:
            result = in_fresh_process(__file__, {"contender": name, "job": job.__dict__, "budget": args.budget,
                                                 "threads": args.threads})
            results.append({"contender": name, "model": model, **result})
            print(f"{model} {name}: {result}", file=sys.stderr, flush=True)
    report(table(results), verdicts(results), env, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
