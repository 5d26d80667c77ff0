"""AdapterDrop's training speed-up and accuracy cost, and ladder side-tuning's peak memory against LoRA's (CPU,
MiniLM-L6 on BBC News; docs/memory.md).

Contenders: LoRA (r=8 on query/value) and a Pfeiffer bottleneck adapter (64 units), each on all six layers and with
AdapterDrop removing it from the first three (fixed n = 3 in training and at inference); LST (reduction 8), with the
side layers' attention dropout the backbone's (0.1) and at 0. Every one trains a copy of the classifier head too,
on batches of 16 articles at 64 tokens (one epoch of 640 training articles in the default 40 steps).

Per contender, in a fresh subprocess (so one contender's freed memory cannot hide another's peak):
  peak RSS    peak resident set while training (VmHWM, reset through /proc/self/clear_refs once the model is built)
              minus the resident set before the model was loaded: weights, adapter, optimizer state, activations;
  step peak   the peak of what one training step allocates and holds at once (torch's CPU allocator events);
  step s      median seconds of a training step (forward, backward, AdamW) over the run, after a warm-up step;
  accuracy    on the first 200 BBC test articles after the steps (AdapterDrop: n = 3 at inference too).
AdapterDrop's speed-up is timed again with both variants of a method built in one process and stepped in rounds
(one step each, the order alternating, after a warm-up round), so that a changing load hits both alike; the same for
one forward pass of the test batch in eval mode (the inference speed-up).

    python benchmarks/bench_adapterdrop.py                # 40 steps per contender, 15 interleaved rounds
    python benchmarks/bench_adapterdrop.py --quick        # 6 steps, 3 rounds: checks it runs
    python benchmarks/bench_adapterdrop.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_quantized import (THREADS, Job, _allocation_peak, _data, _in_subprocess, _quality,  # noqa: E402
                             _release_freed_memory, _rss_bytes, _tokenizer)

SEED = 0
DROPPED = 3  # the first half of MiniLM-L6's layers
TARGETS = {"speedup": 1.2, "lst_peak": 0.5}  # AdapterDrop step speed-up ≥; LST peak RSS ≤ × LoRA's
JOB = Job("minilm", "classify-text", "bbc-news", ["query", "value"], ["classifier"], batch=16, max_length=64,
          train_rows=640, eval_rows=200, steps=40, lr=2e-3)


def _lora(drop: int) -> Any:
    import peftkit

    return peftkit.LoRA(r=8, alpha=16, targets=JOB.targets, modules_to_save=JOB.head,
                        adapter_drop={"first_layers": drop} if drop else None)


def _bottleneck(drop: int) -> Any:
    import peftkit

    return peftkit.Bottleneck.preset("pfeiffer", bottleneck=64, modules_to_save=JOB.head,
                                     adapter_drop={"first_layers": drop} if drop else None)


def _lst(attention_dropout: float | None) -> Any:
    from peftkit.methods import LST

    return LST(reduction=8, attention_dropout=attention_dropout, modules_to_save=JOB.head)


CONTENDERS: dict[str, Callable[[], Any]] = {
    "LoRA": lambda: _lora(0), f"LoRA, drop {DROPPED}": lambda: _lora(DROPPED),
    "bottleneck": lambda: _bottleneck(0), f"bottleneck, drop {DROPPED}": lambda: _bottleneck(DROPPED),
    "LST": lambda: _lst(0.0), "LST, backbone's attention dropout": lambda: _lst(None),
}
PAIRS = [("LoRA", f"LoRA, drop {DROPPED}"), ("bottleneck", f"bottleneck, drop {DROPPED}")]


# ----------------------------------------------------------------------------- in the subprocess


def _model(contender: str) -> nn.Module:
    import peftkit
    from peftkit.models import load_minilm

    torch.manual_seed(SEED)
    model = load_minilm(num_labels=5)[0]
    return peftkit.attach(model, CONTENDERS[contender]())


class Run:
    """A contender's model with its optimizer, stepped on a seeded stream of training batches."""

    def __init__(self, contender: str, task: Any, data: Any, lr: float, batch: int):
        self.model = _model(contender).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr)
        self.task, self.data, self.batch = task, data, batch
        self.order = torch.randperm(next(iter(data.train.values())).shape[0], generator=torch.Generator().manual_seed(SEED))
        self.done = 0

    def step(self) -> None:
        start = self.done * self.batch % self.order.numel()
        idx = self.order[start:start + self.batch]
        stats = self.task.row_stats(self.model, self.task.collate(self.data.train, idx))
        (stats.loss_sum.sum() / stats.units.sum()).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.done += 1

    @torch.inference_mode()
    def infer(self) -> None:
        self.model.eval()
        self.task.row_stats(self.model, self.task.collate(self.data.eval, torch.arange(self.batch)))
        self.model.train()


def _setup(job: Job) -> tuple[Any, Any]:
    torch.set_num_threads(THREADS)
    return _data(job, _tokenizer(job))


def measure(contender: str, job: Job) -> dict[str, Any]:
    task, data = _setup(job)
    _release_freed_memory()
    before = _rss_bytes()
    run = Run(contender, task, data, job.lr, job.batch)
    _release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on
    times = []
    for _ in range(job.steps + 1):  # the first is a warm-up
        tick = time.perf_counter()
        run.step()
        times.append(time.perf_counter() - tick)
    peak_rss = _rss_bytes("VmHWM") - before
    return {"contender": contender, "peak_rss_bytes": peak_rss, "step_peak_bytes": _allocation_peak(run.step),
            "step_s": statistics.median(times[1:]), "accuracy": _quality(run.model, task, data.eval),
            "trainable": sum(p.numel() for p in run.model.parameters() if p.requires_grad)}


def interleaved(contenders: list[str], job: Job, rounds: int) -> dict[str, dict[str, float]]:
    """Median seconds of a training step and of an inference forward pass per contender, stepped in rounds."""
    task, data = _setup(job)
    runs = {name: Run(name, task, data, job.lr, job.batch) for name in contenders}
    times = {name: {"train": [], "infer": []} for name in contenders}
    for index in range(rounds + 1):
        for name in contenders if index % 2 else reversed(contenders):
            for kind, work in (("train", runs[name].step), ("infer", runs[name].infer)):
                tick = time.perf_counter()
                work()
                if index:  # round 0 warms up
                    times[name][kind].append(time.perf_counter() - tick)
    return {name: {kind: statistics.median(values) for kind, values in kinds.items()} for name, kinds in times.items()}


# ----------------------------------------------------------------------------- driving and reporting


def _work(request: dict[str, Any]) -> Any:
    job = Job(**request["job"])
    if request["kind"] == "measure":
        return measure(request["contender"], job)
    return interleaved(request["contenders"], job, request["rounds"])


def report(results: dict[str, dict[str, Any]], timed: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| contender | trainable | peak RSS MiB | × LoRA | step peak MiB | step s | interleaved step s | "
             "interleaved forward s | accuracy |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lora = results.get("LoRA", {})
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * 7)
            continue
        ratio = f"{r['peak_rss_bytes'] / lora['peak_rss_bytes']:.2f}" if "peak_rss_bytes" in lora else "–"
        steps = timed.get(name, {})
        lines.append(f"| {name} | {r['trainable']:,} | {r['peak_rss_bytes'] / 2**20:.0f} | {ratio} "
                     f"| {r['step_peak_bytes'] / 2**20:.0f} | {r['step_s']:.3f} "
                     f"| {steps.get('train', float('nan')):.3f} | {steps.get('infer', float('nan')):.3f} "
                     f"| {r['accuracy']:.3f} |")
    lines.append("")
    for full, dropped in PAIRS:
        if full in timed and dropped in timed and "error" not in results.get(dropped, {"error": 1}):
            speedup = timed[full]["train"] / timed[dropped]["train"]
            cost = results[full]["accuracy"] - results[dropped]["accuracy"]
            lines.append(f"{dropped}: training steps {speedup:.2f}× faster than all layers (target ≥ "
                         f"{TARGETS['speedup']}: {'met' if speedup >= TARGETS['speedup'] else 'missed'}), inference "
                         f"{timed[full]['infer'] / timed[dropped]['infer']:.2f}× faster, accuracy "
                         f"{-100 * cost:+.1f} points")
    for name in [n for n in results if n.startswith("LST") and "peak_rss_bytes" in results[n]]:
        if "peak_rss_bytes" in lora:
            ratio = results[name]["peak_rss_bytes"] / lora["peak_rss_bytes"]
            lines.append(f"{name}: peak RSS {ratio:.2f}× LoRA's (target ≤ {TARGETS['lst_peak']}: "
                         f"{'met' if ratio <= TARGETS['lst_peak'] else 'missed'}), step-peak tensors "
                         f"{results[name]['step_peak_bytes'] / lora['step_peak_bytes']:.2f}× LoRA's")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one measurement, in a fresh process
    parser.add_argument("--quick", action="store_true", help="6 steps per contender, 3 interleaved rounds")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per contender (default {JOB.steps})")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_work(json.loads(args.worker))))
        return 0
    job = Job(**{**asdict(JOB), "steps": args.steps or (6 if args.quick else JOB.steps)})
    rounds = args.rounds or (3 if args.quick else 15)
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": THREADS,
           "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(), "argv": sys.argv[1:],
           "date": time.strftime("%Y-%m-%d")}
    results = {}
    for name in CONTENDERS:
        results[name] = _in_subprocess({"kind": "measure", "contender": name, "job": asdict(job)}, __file__)
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    timed: dict[str, dict[str, float]] = {}
    for pair in PAIRS:
        answer = _in_subprocess({"kind": "interleave", "contenders": list(pair), "job": asdict(job), "rounds": rounds},
                                __file__)
        if "error" not in answer:
            timed.update(answer)
        print(f"{pair}: {answer}", file=sys.stderr, flush=True)
    env["loadavg_end"] = os.getloadavg()
    print("\n".join(report(results, timed)))
    print(f"environment: {env}")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": results, "interleaved": timed}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
