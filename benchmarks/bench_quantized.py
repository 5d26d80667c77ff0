"""Quantized bases side by side (CPU): fp32 LoRA, peftkit QLoRA (NF4 + double quantization, int8 embedding tables;
and with the tables kept fp32), LoftQ, QA-LoRA (grouped INT4) and peft's QLoRA on bitsandbytes, on SmolLM2-135M
(chatterbot) and MiniLM-L6 (BBC News).

Per contender and model, in a fresh subprocess (so one contender's freed memory cannot hide another's peak):
  resident   bytes of the base's weights as held (parameters, buffers, 4-bit quant states; tied tensors once),
             and its ratio to fp32;
  peak       peak training memory in tensors: the base's resident bytes, plus the adapter's parameters and
             optimizer state ("kept"), plus the peak of what one training step allocates and holds at once ("step":
             activations, gradients, dequantized weight blocks, optimizer temporaries), from torch's CPU allocator events
             (profiler, profile_memory); tracemalloc does not see torch's allocations. Also reported: peak RSS while
             training (VmHWM, reset through /proc/self/clear_refs once the model is built) minus the RSS before the
             model was loaded, which adds the process's own growth (thread pools, kernels, allocator caches);
  step       median seconds of one training step (forward, backward, AdamW), after a warm-up step; with
             --interleave R, measured again with every contender of a model built in one process and stepped in
             rounds (one step each, the order alternating), so that a changing load hits all of them alike;
  quality    held-out answer loss on chatterbot (SmolLM2) or accuracy on BBC News (MiniLM), before and after the
             steps.

peft + bitsandbytes: transformers' `BitsAndBytesConfig` loading is GPU-oriented, so the peft contender quantizes the
same Linear layers with plain `bitsandbytes.nn.Linear4bit` (NF4, double quant, block 64; its embeddings stay fp32,
as in transformers' bitsandbytes loading) and attaches peft's LoRA, which dispatches to its bitsandbytes LoRA layer.
Its layers' bf16 CPU inference path is switched off, as peftkit's are: evaluating before training would otherwise
repack the weights for inference and break the training forward after it. More rows (LoftQ, QA-LoRA) are added with `register(...)`.

    python benchmarks/bench_quantized.py --quick            # a few steps per contender
    python benchmarks/bench_quantized.py --interleave 5 --json out.json
    python benchmarks/bench_quantized.py --batch 1 --max-length 32 --steps 3   # memory where the weights dominate
    python benchmarks/bench_quantized.py --tables            # the embedding table formats compared
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _memory import (by_contender, failed_row, in_fresh_process, release_freed_memory, report, reset_peak,
                     results_by_model, rss_bytes, verdict)

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
    steps: int  # a full run's training steps (--quick: 8)
    lr: float


JOBS = {  # MiniLM: 2 epochs of 960 articles, scored on the whole test split (426)
    "minilm": Job("minilm", "classify-text", "bbc-news", ["query", "value"], ["classifier"], 16, 64, 960, 426, 120,
                  2e-3),
    "smollm2": Job("smollm2", "causal-lm-chat", "chatterbot", ["q_proj", "v_proj"], [], 8, 96, 320, 64, 40, 1e-3),
}

Builder = Callable[[Job], nn.Module]  # the model with its trainable adapter attached, tokenizer loaded separately
CONTENDERS: dict[str, Builder] = {}
DEFAULT_CONTENDERS: list[str] = []  # run unless --only names others


def register(name: str, default: bool = True) -> Callable[[Builder], Builder]:
    """Add a contender: `build(job)` returns the model with its adapter, ready to train. `default=False`: run only
    when --only names it."""
    def add(build: Builder) -> Builder:
        CONTENDERS[name] = build
        if default:
            DEFAULT_CONTENDERS.append(name)
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
    return _peftkit_lora(_load(job, quantize="nf4"), job)  # embedding tables int8 (the default)


@register("peftkit QLoRA, fp32 tables")
def peftkit_qlora_float_tables(job: Job) -> nn.Module:
    return _peftkit_lora(_load(job, quantize={"scheme": "nf4", "embeddings": "keep"}), job)


@register("peftkit LoftQ")
def peftkit_loftq(job: Job) -> nn.Module:
    """QLoRA's base with LoRA's A, B from LoftQ (5 alternations) on the targets, from the float weights."""
    from peftkit.core.targets import match_targets
    from peftkit.efficient.loftq import loftq_initialise
    from peftkit.efficient.quantize import quantize

    model = _load(job)
    weights = {f"{name}.weight": model.get_submodule(name).weight.detach().clone()
               for name in match_targets(model, job.targets)}
    quantize(model)
    _peftkit_lora(model, job)
    loftq_initialise(model, "default", weights, iters=5)
    return model


@register("peftkit QA-LoRA")
def peftkit_qalora(job: Job) -> nn.Module:
    """Every Linear but the head in grouped INT4 (groups of 32), the tables int8, QA-LoRA r=8 on the targets."""
    import peftkit
    from peftkit.efficient.int4 import quantize_int4
    from peftkit.efficient.quantize import quantize
    from peftkit.methods.reparameterized.qalora import QALoRA

    model = _load(job)
    quantize_int4(model, "all-linear", group_size=32, exclude=job.head or None)
    quantize(model)  # the embedding tables (and a head tied to one)
    return peftkit.attach(model, QALoRA(r=8, alpha=16, targets=job.targets, modules_to_save=job.head))


def _checkpointed(model: nn.Module) -> nn.Module:
    """Gradient checkpointing on the transformer blocks (what peft's prepare_model_for_kbit_training turns on)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@register("fp32 LoRA + checkpointing", default=False)
def fp32_lora_checkpointed(job: Job) -> nn.Module:
    return _checkpointed(fp32_lora(job))


@register("peftkit QLoRA + checkpointing", default=False)
def peftkit_qlora_checkpointed(job: Job) -> nn.Module:
    return _checkpointed(peftkit_qlora(job))


@register("peft+bnb QLoRA")
def peft_qlora(job: Job) -> nn.Module:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from peftkit.efficient.quantize import QuantizeConfig, choose_layers

    model = _load(job)
    for name in choose_layers(model, QuantizeConfig()).linears:  # the same Linear layers peftkit quantizes
        linear = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        layer.support_avx512bf16_for_cpu = False  # evaluate with the training forward, as peftkit's layers do
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


@dataclass
class Training:
    """A contender's model ready to train, with its optimizer and one training step."""

    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]


def _training(contender: str, job: Job, task: Any, data: Any) -> Training:
    model = CONTENDERS[contender](job)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.lr)
    generator = torch.Generator().manual_seed(SEED)
    n_rows = next(iter(data.train.values())).shape[0]

    def step() -> None:
        stats = task.row_stats(model, task.collate(data.train, torch.randperm(n_rows, generator=generator)[:job.batch]))
        (stats.loss_sum.sum() / stats.units.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Training(model, params, optimizer, step)


def _setup(job: Job) -> tuple[Any, Any]:
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    return _data(job, _tokenizer(job))


def measure(contender: str, job: Job, steps: int) -> dict[str, Any]:
    task, data = _setup(job)
    release_freed_memory()
    before = rss_bytes()
    run = _training(contender, job, task, data)
    resident = base_bytes(run.model)
    quality_before = _quality(run.model, task, data.eval)
    release_freed_memory()
    reset_peak()  # peak RSS from here on
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        run.step()
        times.append(time.perf_counter() - start)
    peak_rss = rss_bytes("VmHWM") - before
    kept = sum(t.numel() * t.element_size() for p in run.params for t in [p, *run.optimizer.state[p].values()]
               if isinstance(t, torch.Tensor))
    step_peak = _allocation_peak(run.step)
    return {"contender": contender, "model": job.model, "batch": job.batch, "max_length": job.max_length,
            "resident_bytes": resident, "kept_bytes": kept, "step_peak_bytes": step_peak,
            "peak_bytes": resident + kept + step_peak,  # what is held between steps, plus a step's own peak
            "peak_rss_bytes": peak_rss, "step_s": statistics.median(times[1:]), "steps": steps,
            "trainable": sum(p.numel() for p in run.params), "quality_before": quality_before,
            "quality": _quality(run.model, task, data.eval),
            "metric": task.metric}


def interleaved_steps(contenders: list[str], job: Job, rounds: int) -> dict[str, float]:
    """Median step seconds per contender, all built in this process and stepped in rounds, one step each, the
    order reversed every other round (after a warm-up round)."""
    task, data = _setup(job)
    runs = {name: _training(name, job, task, data) for name in contenders}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for index in range(rounds + 1):
        for name in contenders if index % 2 else reversed(contenders):
            start = time.perf_counter()
            runs[name].step()
            if index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# ----------------------------------------------------------------------------- driving and reporting


def _in_subprocess(request: dict[str, Any], script: str = __file__) -> Any:
    """A worker request (`measure` or `interleaved_steps`) run in a fresh Python process of `script` (this one, or a
    benchmark that shares these helpers); its JSON answer."""
    return in_fresh_process(script, request)


def _work(request: dict[str, Any]) -> Any:
    job = Job(**request["job"])
    if request["kind"] == "measure":
        return measure(request["contender"], job, request["steps"])
    if request["kind"] == "tables":
        return table_formats(job)
    return interleaved_steps(request["contenders"], job, request["rounds"])


def table_formats(job: Job) -> list[dict[str, Any]]:
    """Per `embeddings` format: the quantized base's resident bytes against fp32, the word table's relative
    rounding error, and (SmolLM2) the bare base's held-out answer loss: what the tables' format costs."""
    import copy

    from peftkit.efficient.quantize import quantize

    task, data = _setup(job)
    float_model = _load(job).eval()
    fp32 = base_bytes(float_model)
    table = float_model.get_input_embeddings().weight.detach()
    rows = [{"model": job.model, "embeddings": "fp32 base", "ratio": 1.0, "table_error": 0.0,
             "quality": _quality(float_model, task, data.eval)}]
    for embeddings in ("keep", "bf16", "int8", "nf4"):
        model = copy.deepcopy(float_model)
        quantize(model, embeddings=embeddings)
        stored = model.get_input_embeddings().weight.detach()
        rows.append({"model": job.model, "embeddings": embeddings, "ratio": base_bytes(model) / fp32,
                     "table_error": float((stored - table).norm() / table.norm()),
                     "quality": _quality(model, task, data.eval)})
    return rows


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | contender | resident base MiB | × fp32 | kept MiB | step peak MiB | peak train MiB | "
             "× fp32 LoRA | peak RSS MiB | step s | interleaved step s | quality |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for model, rows in results_by_model(results).items():
        ref = by_contender(rows).get("fp32 LoRA")
        for r in rows:
            if "error" in r:
                lines.append(failed_row(r, 10))
                continue
            ratio = lambda key: f"{r[key] / ref[key]:.3f}" if ref else "–"  # noqa: E731
            interleaved = f"{r['interleaved_step_s']:.3f}" if "interleaved_step_s" in r else "–"
            lines.append(f"| {model} | {r['contender']} | {_mib(r['resident_bytes'])} | {ratio('resident_bytes')} "
                         f"| {_mib(r['kept_bytes'])} | {_mib(r['step_peak_bytes'])} | {_mib(r['peak_bytes'])} "
                         f"| {ratio('peak_bytes')} | {r['peak_rss_bytes'] / 2**20:.0f} | {r['step_s']:.3f} "
                         f"| {interleaved} | {r['metric']} {r['quality_before']:.3f} → {r['quality']:.3f} |")
    return "\n".join(lines)


def verdicts(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for model, rows in results_by_model(results).items():
        by = by_contender(rows)
        ref, peft = by.get("fp32 LoRA"), by.get("peft+bnb QLoRA")
        for name in [n for n in by if n.startswith("peftkit")]:
            q = by[name]
            if ref:
                for key, goal in (("resident_bytes", TARGETS["resident"]), ("peak_bytes", TARGETS["peak"])):
                    ratio = q[key] / ref[key]
                    out.append(f"{model}: {name} {key.split('_')[0]} {ratio:.3f}× fp32 (target ≤ {goal}): "
                               f"{verdict(ratio, goal)}")
                if q["metric"] == "accuracy":
                    out.append(f"{model}: {name} accuracy {100 * (q['quality'] - ref['quality']):+.1f} points "
                               "against fp32 LoRA (target: within 2)")
            if peft and "QLoRA" in name:
                key = "interleaved_step_s" if "interleaved_step_s" in q and "interleaved_step_s" in peft else "step_s"
                ratio = q[key] / peft[key]
                out.append(f"{model}: {name} {key.replace('_', ' ')} {ratio:.3f}× peft's QLoRA (target ≤ 1): "
                           f"{verdict(ratio, 1)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 training steps per contender")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: each model's, quick 8)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: each model's)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (default: each model's)")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="also time the contenders interleaved in one process, ROUNDS steps each")
    parser.add_argument("--tables", action="store_true",
                        help="only compare the embedding table formats (NF4 layers; resident, table error, loss)")
    parser.add_argument("--models", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--only", nargs="+", default=None, help="contenders to run (default: " +
                        ", ".join(DEFAULT_CONTENDERS) + f"; also: {', '.join(set(CONTENDERS) - set(DEFAULT_CONTENDERS))})")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_work(json.loads(args.worker))))
        return 0
    unknown = sorted(set(args.only or []) - set(CONTENDERS))
    if unknown:
        parser.error(f"--only: unknown contenders {unknown}; registered: {list(CONTENDERS)}")
    contenders = args.only or DEFAULT_CONTENDERS
    if args.tables:
        rows = [row for name in args.models for row in _work({"kind": "tables", "job": JOBS[name].__dict__})]
        print("| model | tables | resident × fp32 | table error (rel. Frobenius) | held-out quality (bare base) |\n"
              "|---|---|---:|---:|---:|")
        for row in rows:
            print(f"| {row['model']} | {row['embeddings']} | {row['ratio']:.3f} | {row['table_error']:.4f} "
                  f"| {row['quality']:.4f} |")
        return 0
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": THREADS,
           "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(), "argv": sys.argv[1:]}
    results = []
    for name in args.models:
        job = JOBS[name]
        job = replace(job, batch=args.batch or job.batch, max_length=args.max_length or job.max_length)
        steps = args.steps or (8 if args.quick else job.steps)
        for contender in contenders:
            result = _in_subprocess({"kind": "measure", "contender": contender, "job": job.__dict__, "steps": steps})
            results.append({"contender": contender, "model": name, **result})
            print(f"{name} {contender}: {result}", file=sys.stderr, flush=True)
        if args.interleave:
            timed = _in_subprocess({"kind": "interleave", "contenders": contenders, "job": job.__dict__,
                                    "rounds": args.interleave})
            for result in results:
                if result["model"] == name and result["contender"] in timed:
                    result["interleaved_step_s"] = timed[result["contender"]]
            env[f"interleaved_{name}"] = timed
            env[f"loadavg_after_{name}"] = os.getloadavg()
    report(table(results), verdicts(results), env, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
