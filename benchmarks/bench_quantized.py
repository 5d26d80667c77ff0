"""Quantized bases side by side (CPU): fp32 LoRA, peftkit QLoRA (NF4 + double quantization) and peft's QLoRA on
bitsandbytes, on SmolLM2-135M (chatterbot) and MiniLM-L6 (BBC News).

Per contender and model, in a fresh subprocess (so one contender's freed memory cannot hide another's peak):
  resident   bytes of the base's weights as held (parameters, buffers, 4-bit quant states; tied tensors once),
             and its ratio to fp32;
  peak       peak training memory in tensors: the base's resident bytes, plus the adapter's parameters and
             optimizer state, plus the peak of what one training step allocates and holds at once (activations,
             gradients, dequantized weight blocks, optimizer temporaries), from torch's CPU allocator events
             (profiler, profile_memory); tracemalloc does not see torch's allocations. Also reported: peak RSS while
             training (VmHWM, reset through /proc/self/clear_refs once the model is built) minus the RSS before the
             model was loaded, which adds the process's own growth (thread pools, kernels, allocator caches);
  step       median seconds of one training step (forward, backward, AdamW), after a warm-up step;
  quality    held-out answer loss on chatterbot (SmolLM2) or accuracy on BBC News (MiniLM) after the steps.

peft + bitsandbytes: transformers' `BitsAndBytesConfig` loading is GPU-oriented, so the peft contender quantizes the
same Linear layers with plain `bitsandbytes.nn.Linear4bit` (NF4, double quant, block 64) and attaches peft's LoRA,
which dispatches to its bitsandbytes LoRA layer. More rows (LoftQ, QA-LoRA) are added with `register(...)`.

    python benchmarks/bench_quantized.py --quick            # a few steps per contender
    python benchmarks/bench_quantized.py --json out.json
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

THREADS = 2
SEED = 0
TARGETS = {"resident": 0.30, "peak": 0.50}  # QLoRA vs fp32 LoRA; step time: no slower than peft's QLoRA


@dataclass(frozen=True)
class Job:
    """One model's benchmark job: which bundled model, task and data, the LoRA targets, and the run's sizes."""

    model: str
    task: str
    data: str
    targets: list[str]
    head: list[str]
    batch: int
    max_length: int
    train_rows: int
    eval_rows: int


JOBS = {
    "minilm": Job("minilm", "classify-text", "bbc-news", ["query", "value"], ["classifier"], 16, 64, 320, 200),
    "smollm2": Job("smollm2", "causal-lm-chat", "chatterbot", ["q_proj", "v_proj"], [], 8, 96, 160, 64),
}

Builder = Callable[[Job], nn.Module]  # the model with its trainable adapter attached, tokenizer loaded separately
CONTENDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Add a contender (a LoftQ or QA-LoRA row): `build(job)` returns the model with its adapter, ready to train."""
    def add(build: Builder) -> Builder:
        CONTENDERS[name] = build
        return build
    return add


def _load(job: Job, quantize: Any = None) -> nn.Module:
    from peftkit.models import load_minilm, load_smollm2

    if job.model == "minilm":
        return load_minilm(num_labels=5, quantize=quantize)[0]
    return load_smollm2(quantize=quantize)[0]


def _peftkit_lora(model: nn.Module, job: Job) -> nn.Module:
    import peftkit

    return peftkit.attach(model, peftkit.LoRA(r=8, alpha=16, targets=job.targets, modules_to_save=job.head))


@register("fp32 LoRA")
def fp32_lora(job: Job) -> nn.Module:
    return _peftkit_lora(_load(job), job)


@register("peftkit QLoRA")
def peftkit_qlora(job: Job) -> nn.Module:
    return _peftkit_lora(_load(job, quantize="nf4"), job)


@register("peft+bnb QLoRA")
def peft_qlora(job: Job) -> nn.Module:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from peftkit.efficient.quantize import QuantizeConfig, choose_layers

    model = _load(job)
    for name in choose_layers(model, QuantizeConfig())[0]:  # the same layers peftkit quantizes
        linear = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", blocksize=64, module=layer)._quantize("cpu")
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=job.targets, modules_to_save=job.head or None,
                        lora_dropout=0.0)
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------- measuring (in the subprocess)


def _allocation_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory that fn() allocates and holds at once (torch's profiler with profile_memory:
    every allocation and free of the CPU allocator in order), as benchmarks/bench_reparam.py measures it."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_reparam import _allocation_peak as peak

    value = peak(fn)
    if value is None:
        raise RuntimeError("this torch has no profiler allocation events")
    return value


def _rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so RSS counts what is alive (glibc keeps them otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def base_bytes(model: nn.Module) -> int:
    """Bytes of the base's weights as held: parameters and buffers outside the adapters, plus every 4-bit quant
    state (peftkit's and plain bitsandbytes' layers alike), each storage once."""
    tensors = [t for name, t in [*model.named_parameters(), *model.named_buffers()]
               if ".peftkit." not in f".{name}" and "lora_" not in name and "modules_to_save" not in name]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _data(job: Job, tokenizer: Any) -> Any:
    from peftkit.train import TASKS
    from peftkit.train.config import DataSection

    section = DataSection(name=job.data, max_length=job.max_length, train_limit=job.train_rows,
                          eval_limit=job.eval_rows)
    task = TASKS[job.task]()
    return task, task.encode(task.read_data(section, SEED), tokenizer, section)


def _tokenizer(job: Job) -> Any:
    from peftkit.models import load_minilm, load_smollm2

    return (load_minilm if job.model == "minilm" else load_smollm2)()[1]


@torch.no_grad()
def _quality(model: nn.Module, task: Any, rows: dict[str, torch.Tensor]) -> float:
    model.eval()
    total, units, correct = 0.0, 0.0, 0
    for idx in torch.arange(next(iter(rows.values())).shape[0]).split(32):
        stats = task.row_stats(model, task.collate(rows, idx))
        total, units = total + float(stats.loss_sum.sum()), units + float(stats.units.sum())
        correct += int(stats.correct.sum()) if stats.correct is not None else 0
    model.train()
    return correct / next(iter(rows.values())).shape[0] if task.metric == "accuracy" else total / units


def measure(contender: str, job: Job, steps: int) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    tokenizer = _tokenizer(job)
    task, data = _data(job, tokenizer)
    _release_freed_memory()
    before = _rss_bytes()
    model = CONTENDERS[contender](job)
    model.train()
    resident = base_bytes(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3 if job.model == "minilm" else 1e-3)
    _release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on
    generator = torch.Generator().manual_seed(SEED)
    n_rows = next(iter(data.train.values())).shape[0]

    def step() -> None:
        stats = task.row_stats(model, task.collate(data.train, torch.randperm(n_rows, generator=generator)[:job.batch]))
        (stats.loss_sum.sum() / stats.units.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_rss = _rss_bytes("VmHWM") - before
    kept = sum(t.numel() * t.element_size() for p in params for t in [p, *optimizer.state[p].values()]
               if isinstance(t, torch.Tensor))
    peak = resident + kept + _allocation_peak(step)  # what is held between steps, plus a step's own peak
    return {"contender": contender, "model": job.model, "resident_bytes": resident, "peak_bytes": peak,
            "peak_rss_bytes": peak_rss,
            "step_s": statistics.median(times[1:]), "steps": steps, "trainable": sum(p.numel() for p in params),
            "quality": _quality(model, task, data.eval), "metric": task.metric}


# ----------------------------------------------------------------------------- driving and reporting


def run_isolated(contender: str, model: str, steps: int) -> dict[str, Any]:
    """`measure` in a fresh Python process."""
    out = subprocess.run([sys.executable, __file__, "--worker", contender, model, str(steps)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        return {"contender": contender, "model": model, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | contender | resident base MiB | × fp32 | peak train MiB | × fp32 LoRA | peak RSS MiB | step s "
             "| quality |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        ref = next((r for r in rows if r["contender"] == "fp32 LoRA" and "error" not in r), None)
        for r in rows:
            if "error" in r:
                lines.append(f"| {model} | {r['contender']} | failed: {r['error']} | | | | | | |")
                continue
            ratio = lambda key: f"{r[key] / ref[key]:.3f}" if ref else "–"  # noqa: E731
            quality = f"{r['metric']} {r['quality']:.3f}"
            lines.append(f"| {model} | {r['contender']} | {r['resident_bytes'] / 2**20:.1f} | {ratio('resident_bytes')} "
                         f"| {r['peak_bytes'] / 2**20:.1f} | {ratio('peak_bytes')} | {r['peak_rss_bytes'] / 2**20:.0f} "
                         f"| {r['step_s']:.3f} | {quality} |")
    return "\n".join(lines)


def verdicts(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in results):
        by = {r["contender"]: r for r in results if r["model"] == model and "error" not in r}
        ref, q, peft = by.get("fp32 LoRA"), by.get("peftkit QLoRA"), by.get("peft+bnb QLoRA")
        if ref and q:
            for key, goal in (("resident_bytes", TARGETS["resident"]), ("peak_bytes", TARGETS["peak"])):
                ratio = q[key] / ref[key]
                out.append(f"{model}: QLoRA {key.split('_')[0]} {ratio:.3f}× fp32 (target ≤ {goal}): "
                           f"{'met' if ratio <= goal else 'missed'}")
        if q and peft:
            ratio = q["step_s"] / peft["step_s"]
            out.append(f"{model}: QLoRA step {ratio:.3f}× peft's QLoRA (target ≤ 1): {'met' if ratio <= 1 else 'missed'}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few training steps per contender")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 40, quick 8)")
    parser.add_argument("--models", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--only", nargs="+", default=None, help="contenders to run (default: all registered)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs=3, metavar=("CONTENDER", "MODEL", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        contender, model, steps = args.worker
        print(json.dumps(measure(contender, JOBS[model], int(steps))))
        return 0
    steps = args.steps or (8 if args.quick else 40)
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": THREADS,
           "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    results = [run_isolated(c, m, steps) for m in args.models for c in (args.only or CONTENDERS)]
    env["loadavg_end"] = os.getloadavg()
    print(table(results))
    print("\n".join(verdicts(results)))
    print(f"environment: {env}")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
