"""Concurrent multi-adapter training: K adapters in one process vs one alone vs K one after another in `peft`.

MiniLM-L6 sequence classification, K LoRA jobs (r=8, alpha=16 on query,value + a trainable classifier
copy each), each with its own random-token data, seed and AdamW; backbone in eval mode (no dropout)
for every contender. Scenarios, each in a fresh subprocess so memory peaks do not mix:

  alone       one job, a plain PyTorch loop (adapter active, forward, mean loss, backward, step)
  concurrent  K jobs in one `MultiJobTrainer`: every step one forward pass over all K batches
  packed      K jobs, `max_rows` = one batch: one job per forward pass, one backbone for all
  peft        the same K jobs through `peft`, one after another in one process (one PeftModel,
              K adapters, `set_adapter` per job)

Reported per scenario: samples/s (rows trained per second, from the median step time), peak RSS
during training (VmHWM, reset after setup via /proc/self/clear_refs) and its ratio to `alone`,
the RSS growth in training (peak minus RSS at the start), and the share of the CPUs other processes
used meanwhile (/proc/stat; above ~10% the timings are unreliable). K separate processes would need
K × the `alone` peak. Check: job 0's losses in `concurrent` and `packed` equal those of `alone`.

    python benchmarks/bench_concurrent.py                 # K=4, batch 8 x 128, 2 warm-up + 10 timed steps per job
    python benchmarks/bench_concurrent.py --quick         # 1 + 3 steps, seq 64
    python benchmarks/bench_concurrent.py --json out.json --adapters 4 --batch 8 --seq 128
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SCENARIOS = ("alone", "concurrent", "packed", "peft")
LABELS = 5


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0) so the peak covers training only, not model loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _jobs(args, vocab: int):
    from bench_lora import make_inputs
    from peftkit.train.concurrent import Job

    jobs = []
    for j in range(args.adapters):
        rows = args.batch * (args.warmup + args.steps)
        data = make_inputs(rows, args.seq, vocab, seed=100 + j)
        data["labels"] = torch.randint(0, LABELS, (rows,), generator=torch.Generator().manual_seed(200 + j))
        jobs.append(Job(f"j{j}", {k: v.to(args.device) for k, v in data.items()},
                        lambda out, y: F.cross_entropy(out, y, reduction="none"),
                        batch_size=args.batch, epochs=1, lr=1e-3, seed=j))
    return jobs


def _timed(step_fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step_fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def _plain_loop(model, job, params, losses: list[float]):
    """A job trained alone: its own batches in its seed's order; returns a one-step function."""
    optimizer = torch.optim.AdamW(params, lr=job.lr)
    batches = job.batch_indices()

    def step():
        inputs, y = job.collate(job.data, next(batches))
        loss = F.cross_entropy(model(**inputs).logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return step


def child(args) -> dict:
    from bench_lora import _cpu_counters, _foreign_share, load_minilm, setup_environment

    import peftkit
    from peftkit.train.concurrent import MultiJobTrainer

    setup_environment()
    torch.manual_seed(0)
    model = load_minilm(num_labels=LABELS).to(args.device).eval()
    jobs = _jobs(args, model.config.vocab_size)
    k = 1 if args.child == "alone" else args.adapters
    losses: list[float] = []
    if args.child == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=8, lora_alpha=16, lora_dropout=0.0)
        model = get_peft_model(model, config, adapter_name=jobs[0].adapter)
        for job in jobs[1:]:
            model.add_adapter(job.adapter, config)
        model.eval()
    else:
        for job in jobs[:k]:
            peftkit.attach(model, peftkit.LoRA(r=8, alpha=16, targets=["query", "value"], modules_to_save=["classifier"]),
                           job.adapter)
    hwm_reset = _reset_peak_rss()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_base = _status_mib("VmRSS")
    counters = _cpu_counters()
    times: list[float] = []
    if args.child in ("concurrent", "packed"):
        trainer = MultiJobTrainer(model, max_rows=args.batch if args.child == "packed" else None)
        for job in jobs:
            trainer.add(job)
        first_losses = []
        step = lambda: first_losses.append(trainer.step()["j0"])  # noqa: E731
        _timed(step, args.warmup)
        times = _timed(step, args.steps)
        losses = first_losses
    else:
        for job in jobs[:k]:
            if args.child == "peft":
                model.set_adapter(job.adapter)
                params = [p for n, p in model.named_parameters() if f".{job.adapter}." in n and p.requires_grad]
            else:
                peftkit.activate(model, job.adapter)
                params = list(peftkit.adapter_parameters(model, job.adapter))
            job_losses: list[float] = []
            step = _plain_loop(model, job, params, job_losses)
            _timed(step, args.warmup)
            times += _timed(step, args.steps)
            losses = losses or job_losses
    step_rows = args.batch * (k if args.child in ("concurrent", "packed") else 1)  # peft: one job per step
    return {
        "scenario": args.child, "adapters": k, "rows_per_step": step_rows,
        "median_step_s": statistics.median(times), "samples_per_s": step_rows / statistics.median(times),
        "rss_base_mib": rss_base, "rss_peak_mib": _status_mib("VmHWM") if hwm_reset else
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_reset_after_setup": hwm_reset,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None,
        "losses_job0": losses, "foreign_cpu_share": _foreign_share(counters, _cpu_counters()),
    }


def render(results: dict[str, dict], adapters: int) -> str:
    alone = results["alone"]
    lines = ["| scenario | adapters | rows per step | samples/s | vs alone | peak RSS MiB | vs alone | growth in training MiB "
             "| other processes' CPU share |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['adapters']} | {r['rows_per_step']} | {r['samples_per_s']:.1f} | "
                     f"{r['samples_per_s'] / alone['samples_per_s']:.2f}× | {r['rss_peak_mib']:.0f} | "
                     f"{r['rss_peak_mib'] / alone['rss_peak_mib']:.2f}× | {r['rss_peak_mib'] - r['rss_base_mib']:.0f} | "
                     f"{r['foreign_cpu_share']:.0%} |")
    lines.append(f"| {adapters} separate processes (computed) | {adapters} | | | | {adapters * alone['rss_peak_mib']:.0f} "
                 f"| {adapters:.2f}× | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="rows per job per step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, help="timed steps per job (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed steps per job first (default 2; --quick 1)")
    p.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed steps, seq 64")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=SCENARIOS, action="append", help="run only these scenarios (alone always runs)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.quick and "--seq" not in (argv or sys.argv):
        args.seq = 64
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    results: dict[str, dict] = {}
    forwarded = [f"--adapters={args.adapters}", f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}",
                 f"--warmup={args.warmup}", f"--device={args.device}"]
    for name in [s for s in SCENARIOS if s == "alone" or not args.only or s in args.only]:
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--child", name, *forwarded], capture_output=True, text=True,
                              cwd=Path(__file__).parent)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"scenario {name} failed")
        results[name] = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[7:])
        print(f"[{name}] {results[name]['samples_per_s']:.1f} samples/s, peak RSS {results[name]['rss_peak_mib']:.0f} MiB "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\nMiniLM-L6, {args.adapters} LoRA jobs (q,v r=8 + classifier), batch {args.batch} x seq {args.seq} per job, "
          f"{args.warmup} warm-up + {args.steps} timed steps, device {args.device}, torch {torch.__version__}\n")
    print(render(results, args.adapters))
    reference = results["alone"]["losses_job0"]
    for name in ("concurrent", "packed"):
        if name in results:
            diff = max(abs(a - b) for a, b in zip(results[name]["losses_job0"], reference))
            print(f"check: job 0's losses, {name} vs alone: max abs diff {diff:.2e} over {len(reference)} steps")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
