"""Serving many adapters over one base (issue #17): the peftkit engine vs adapter switching vs `peft`'s mixed batches.

SmolLM2-135M-Instruct (`peftkit.models.load_smollm2`), float32, CPU, `torch.set_num_threads(2)`. 64 random LoRA
adapters (r=8, alpha=16 on q_proj, v_proj; A at peft's init, B ~ N(0, 0.02)) are made with Hugging Face `peft`,
saved in its format, and the same files are loaded into peftkit (`peftkit.load`), so every contender serves
identical adapters. Prompts are chatterbot questions through the chat template; output lengths are the answers'
token counts (capped). Greedy decoding everywhere; a request ends at EOS or its max_tokens.

Contenders: the peftkit `Engine` (continuous batching, one routed forward per step); **adapter switching** (a
server on `peft`'s `set_adapter`: requests grouped by adapter, per group `set_adapter` + one left-padded `generate`
of the group, one group after another); **peft mixed** (one left-padded `generate(..., adapter_names=...)` over
all rows, a static batch). Sections, each side by side in one process:

  64-adapters  64 requests over 64 adapters submitted at once, max_tokens 32: output tokens/s (target: engine
               >= 8x adapter switching)
  single       one request alone, max_tokens 64: engine vs `generate` (peftkit adapter active; peft's), and the
               engine's per-step overhead over the bare model forward at batch 1 with a DynamicCache (target:
               engine >= generate)
  registered   1,000 registered adapters vs 10, the same 8 in use, 32 requests (target: within 5%)
  mix          decode iteration with 64 running rows: 64 LoRA vs 16 LoRA + 16 (IA)3 + 16 prefix + 16 bottleneck
               (target: mix <= 1.2x LoRA)
  http         32 streamed chat completions over 8 adapters sent at once through `peftkit serve`'s HTTP app
               (uvicorn on a local port, httpx) vs the same requests submitted to the engine in Python: output
               tokens/s (target: HTTP >= 90% of the engine)
  open-loop    Poisson arrivals at --rate over 64 adapters, popularity distinct / uniform / zipf-1.5 / identical,
               engine vs adapter switching: tokens/s, TTFT, TPOT, end-to-end p50/p99 (plots open-loop.png)

    python benchmarks/bench_serve.py                     # every section (about 15 min on 2 CPU cores)
    python benchmarks/bench_serve.py --quick             # fewer requests and tokens (a few minutes)
    python benchmarks/bench_serve.py --only single mix   # some sections
    python benchmarks/bench_serve.py --only open-loop --rate 4 --requests 200
    python benchmarks/bench_serve.py --steady 600 --rate 3   # the engine alone under steady load for 10 minutes:
                                                             # failed requests, latencies, RSS over time (rss.png)

Output (--output, default runs/bench-serve/<quick|full>): results.json, report.md (dated, with the command line,
versions and the other processes' CPU share per section: the machine may be shared), and the plots.
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import peftkit
from bench_lora import _cpu_counters, _foreign_share, setup_environment
from peftkit import IA3, Bottleneck, PrefixTuning
from peftkit.data import load_chatterbot
from peftkit.models import load_smollm2
from peftkit.serve import AdapterStore, Engine, FinishEvent, GenerationRequest, SamplingParams, ServeError

ADAPTERS = 64
LORA = {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
POPULARITY = ("distinct", "uniform", "zipf-1.5", "identical")
SECTIONS = ("64-adapters", "single", "registered", "http", "open-loop", "mix")  # mix attaches more adapters: last


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    adapter: str


@dataclass
class Timing:
    """One request's life in an open-loop run (perf_counter seconds)."""

    arrival: float
    tokens: int = 0
    first: float | None = None
    last: float | None = None
    end: float | None = None
    error: str | None = None


# --- setup ---------------------------------------------------------------------------------------------------------


class Clock:
    """The engine's metrics hooks, timestamped: `set_running` then `set_queue` end every iteration."""

    def __init__(self):
        self.iterations: list[tuple[float, int, int]] = []  # (end time, running rows, waiting requests)
        self.gaps: list[float] = []  # seconds between a row's consecutive tokens
        self._running = 0

    def set_running(self, n: int) -> None:
        self._running = n

    def set_queue(self, n: int) -> None:
        self.iterations.append((time.perf_counter(), self._running, n))

    def token_gap(self, seconds: float) -> None:
        self.gaps.append(seconds)

    def queued(self) -> None: ...
    def started(self) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def tokens(self, n: int) -> None: ...
    def finished(self, reason: str) -> None: ...


class StepClock(LogitsProcessor):
    """`generate`'s decode steps, timestamped: called once per step, right after the forward."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def make_adapters(peft_base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """ADAPTERS random LoRA adapters a0.. on `peft_base` with `peft`, each saved to folder/<name> (PEFT format)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    names = [f"a{i}" for i in range(ADAPTERS)]
    model = get_peft_model(peft_base, LoraConfig(**LORA), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**LORA))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in names:
                    module.lora_B[name].weight.normal_(0, 0.02, generator=generator)
    model.save_pretrained(folder, selected_adapters=names)
    return model.eval()


def perturb(model: torch.nn.Module, name: str, std: float = 0.02) -> None:
    """Non-zero weights around the adapter's init (an (IA)3 scale near 1, a bottleneck's up-projection near 0)."""
    with torch.no_grad():
        for parameter in peftkit.adapter_parameters(model, name):
            parameter.add_(torch.randn_like(parameter) * std)


def save_mix(model: torch.nn.Module, folder: Path) -> list[str]:
    """16 each of (IA)3, prefix and bottleneck adapters, perturbed, saved to folder/<name> (peftkit format; attached
    to `model` only meanwhile); with 16 of the LoRA adapters: the mixed set."""
    kinds = {"ia3": IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
             "prefix": PrefixTuning(num_virtual_tokens=10), "bottleneck": Bottleneck.preset("pfeiffer")}
    torch.manual_seed(2)
    names = []
    for kind, config in kinds.items():
        for i in range(ADAPTERS // 4):
            name = f"{kind}{i}"
            peftkit.attach(model, config, name=name, activate=False)
            perturb(model, name)
            peftkit.save(model, folder / name, name=name)
            peftkit.remove(model, name)
            names.append(name)
    return [f"a{i}" for i in range(ADAPTERS // 4)] + names


def questions(count: int, seed: int = 0) -> list[dict[str, str]]:
    """`count` chatterbot question/answer pairs, shuffled (the corpus's 1,179 again for long runs)."""
    pairs = load_chatterbot()
    random.Random(seed).shuffle(pairs)
    return [pairs[i % len(pairs)] for i in range(count)]


def dialogues(engine: Engine, tokenizer: Any, count: int, cap: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(chat prompt ids, answer length capped at `cap`) of `count` chatterbot question/answer pairs."""
    return [(engine.chat_ids([{"role": "user", "content": p["question"]}]),
             max(1, min(cap, len(tokenizer(p["answer"])["input_ids"])))) for p in questions(count, seed)]


def popularity(kind: str, count: int, rng: np.random.Generator) -> list[str]:
    if kind == "distinct":
        ranks = np.arange(count) % ADAPTERS
    elif kind == "uniform":
        ranks = rng.integers(0, ADAPTERS, count)
    elif kind == "zipf-1.5":
        weights = 1 / np.arange(1, ADAPTERS + 1) ** 1.5
        ranks = rng.choice(ADAPTERS, count, p=weights / weights.sum())
    else:
        ranks = np.zeros(count, dtype=int)
    return [f"a{r}" for r in ranks]


# --- contenders ----------------------------------------------------------------------------------------------------


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0)


def engine_closed(engine: Engine, requests: list[Request]) -> tuple[float, list[list[int]]]:
    """All requests submitted at once; (wall seconds, each output's tokens)."""
    engine.start()
    try:
        start = time.perf_counter()
        handles = [engine.submit(GenerationRequest(r.prompt, r.adapter, greedy(r.max_tokens))) for r in requests]
        finishes = [list(handle)[-1] for handle in handles]
        wall = time.perf_counter() - start
    finally:
        engine.stop()
    failed = [f.error for f in finishes if f.reason == "error"]
    if failed:
        raise RuntimeError(f"{len(failed)} engine requests failed, first: {failed[0]}")
    return wall, [f.tokens for f in finishes]


def http_closed(engine: Engine, store: AdapterStore, bodies: list[dict[str, Any]]) -> tuple[float, int]:
    """All chat completions posted at once to a live `peftkit serve` app over this engine (streamed; the tokens
    counted from each stream's usage chunk); (wall seconds from the first post to the last [DONE], output tokens)."""
    import asyncio

    import httpx
    import uvicorn

    from peftkit.serve.http import create_app

    async def one(client: httpx.AsyncClient, body: dict[str, Any]) -> int:
        tokens = None
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    tokens = usage["completion_tokens"] if usage else tokens
        if tokens is None:
            raise RuntimeError("a stream ended without its usage chunk")
        return tokens

    async def all_of(url: str) -> tuple[float, int]:
        async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_connections=None)) as client:
            start = time.perf_counter()
            counts = await asyncio.gather(*(one(client, body) for body in bodies))
            return time.perf_counter() - start, sum(counts)

    server = uvicorn.Server(uvicorn.Config(create_app(engine, store), host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    engine.start()
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        return asyncio.run(all_of(f"http://127.0.0.1:{port}"))
    finally:
        server.should_exit = True
        thread.join(20)
        engine.stop()


def truncated(tokens: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    tokens = tokens[:max_tokens]
    ends = [i for i, token in enumerate(tokens) if token in eos]
    return tokens[:ends[0]] if ends else tokens


def generate_batch(model: torch.nn.Module, requests: list[Request], pad: int, eos: set[int],
                   **kwargs: Any) -> tuple[list[list[int]], list[float]]:
    """One left-padded greedy `generate` of the requests; (each output cut at EOS / its max_tokens, step times)."""
    width = max(len(r.prompt) for r in requests)
    ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in requests])
    mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in requests])
    clock = StepClock()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in requests),
                             do_sample=False, pad_token_id=pad, logits_processor=LogitsProcessorList([clock]),
                             **kwargs)
    return [truncated(row[width:].tolist(), r.max_tokens, eos) for row, r in zip(out, requests)], clock.times


def by_adapter(requests: list[Request]) -> dict[str, list[int]]:
    """Request indices per adapter, the adapters in order of their first request (FCFS)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, request in enumerate(requests):
        groups[request.adapter].append(i)
    return groups


def switching_batch(peft_model: torch.nn.Module, requests: list[Request], pad: int, eos: set[int],
                    on_group: Callable[[list[int], list[list[int]], list[float]], None] | None = None
                    ) -> list[list[int]]:
    """Adapter switching: per adapter, `set_adapter` + one `generate` of its requests, one group after another."""
    outputs: list[list[int]] = [[] for _ in requests]
    for name, indices in by_adapter(requests).items():
        peft_model.set_adapter(name)
        tokens, steps = generate_batch(peft_model, [requests[i] for i in indices], pad, eos)
        for i, output in zip(indices, tokens):
            outputs[i] = output
        if on_group is not None:
            on_group(indices, tokens, steps)
    return outputs


def peft_mixed(peft_model: torch.nn.Module, requests: list[Request], pad: int, eos: set[int]) -> list[list[int]]:
    return generate_batch(peft_model, requests, pad, eos, adapter_names=[r.adapter for r in requests])[0]


def in_worker(run: Callable[[], Any]) -> Any:
    """`run()` on a fresh thread, as the engine runs its model on its scheduler thread. Every contender runs so:
    on a busy machine, 2 OpenMP threads driven from the main thread were measured ~7x slower per forward (and
    burned both cores) than the same forward driven from another thread, which would skew the comparison."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = run()
        except BaseException as error:  # re-raised on the calling thread
            outcome["error"] = error

    worker = threading.Thread(target=target)
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def timed(run: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    """(wall seconds, outputs) of `run` on a worker thread."""
    start = time.perf_counter()
    outputs = in_worker(run)
    return time.perf_counter() - start, outputs


def same_outputs(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b))


# --- sections ------------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    model: torch.nn.Module  # peftkit's copy: the store loads the peft files onto it
    peft_model: torch.nn.Module
    tokenizer: Any
    folder: Path  # the saved adapters
    engine: Engine = field(init=False)
    clock: Clock = field(init=False)
    stores: list[AdapterStore] = field(default_factory=list)

    def __post_init__(self):
        self.clock = Clock()
        self.engine = Engine(self.model, self.tokenizer, self.store({f"a{i}": f"a{i}" for i in range(ADAPTERS)}),
                             max_batch=64, metrics=self.clock)
        self.pad, self.eos = self.tokenizer.pad_token_id, self.engine.eos

    def store(self, registered: dict[str, str]) -> AdapterStore:
        """An AdapterStore on the model with `registered` (name -> directory under the folder); none loaded yet."""
        store = AdapterStore(self.model, self.folder)
        for name, directory in registered.items():
            store.register(name, directory)
        self.stores.append(store)
        return store

    def close(self) -> None:
        for store in self.stores:
            store.close()

    def load_all(self) -> None:
        """One short request per adapter: the store reads and attaches all 64 (and the cache grows once)."""
        requests = self.workload(ADAPTERS, 2, [f"a{i}" for i in range(ADAPTERS)], fixed=2)
        engine_closed(self.engine, requests)

    def workload(self, count: int, cap: int, adapters: list[str], fixed: int | None = None) -> list[Request]:
        return [Request(prompt, fixed or length, adapter)
                for (prompt, length), adapter in zip(dialogues(self.engine, self.tokenizer, count, cap), adapters)]

    def check_adapters(self) -> dict[str, float]:
        """peftkit's routed logits equal peft's for the same file; the adapter changes them."""
        ids = torch.tensor([self.engine.chat_ids([{"role": "user", "content": "What is a computer?"}])])
        self.peft_model.set_adapter("a5")
        with torch.inference_mode():
            theirs = self.peft_model(input_ids=ids).logits
            with peftkit.routed(self.model, ["a5"]):
                ours = self.model(input_ids=ids).logits
            with peftkit.disabled(self.model):
                base = self.model(input_ids=ids).logits
        return {"peftkit_vs_peft": (ours - theirs).abs().max().item(),
                "peftkit_vs_base": (ours - base).abs().max().item(), "peft_vs_base": (theirs - base).abs().max().item()}

    def section_64_adapters(self) -> dict[str, Any]:
        a = self.args
        requests = self.workload(ADAPTERS, a.max_tokens, [f"a{i}" for i in range(ADAPTERS)], fixed=a.max_tokens)
        peft_mixed(self.peft_model, [Request(r.prompt, 2, r.adapter) for r in requests[:4]], self.pad, self.eos)
        runs = {"engine": lambda: engine_closed(self.engine, requests),
                "adapter switching": lambda: timed(lambda: switching_batch(self.peft_model, requests, self.pad,
                                                                           self.eos)),
                "peft mixed": lambda: timed(lambda: peft_mixed(self.peft_model, requests, self.pad, self.eos))}
        rows, outputs = {}, {}
        for name, run in runs.items():
            wall, outputs[name] = run()
            tokens = sum(map(len, outputs[name]))
            rows[name] = {"seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall}
            print(f"  {name}: {tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tokens/s", flush=True)
        for name, row in rows.items():
            row["vs_switching"] = row["tokens_per_s"] / rows["adapter switching"]["tokens_per_s"]
            row["same_outputs_as_engine"] = same_outputs(outputs[name], outputs["engine"])
        return {"requests": len(requests), "max_tokens": a.max_tokens, "contenders": rows,
                "target": {"engine_vs_switching": 8.0, "met": rows["engine"]["vs_switching"] >= 8.0}}

    def bare_step(self, prompt: list[int], steps: int) -> float:
        """Median seconds of one batch-1 decode forward with a DynamicCache (greedy), whatever is active."""
        cache, times = DynamicCache(), []
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits
            for _ in range(steps):
                token = logits[:, -1:].argmax(-1)
                start = time.perf_counter()
                logits = self.model(input_ids=token, past_key_values=cache, use_cache=True).logits
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    def section_single(self) -> dict[str, Any]:
        a = self.args
        request = self.workload(1, a.single_tokens, ["a0"], fixed=a.single_tokens)[0]

        def peftkit_generate():
            peftkit.activate(self.model, "a0")
            try:
                return generate_batch(self.model, [request], self.pad, self.eos)
            finally:
                peftkit.activate(self.model, [])

        def peft_generate():
            self.peft_model.set_adapter("a0")
            return generate_batch(self.peft_model, [request], self.pad, self.eos)

        contenders = {"engine": lambda: engine_closed(self.engine, [request]),
                      "generate (peftkit adapter active)": lambda: timed(lambda: peftkit_generate()[0]),
                      "generate (peft)": lambda: timed(lambda: peft_generate()[0])}
        samples: dict[str, list[float]] = defaultdict(list)
        outputs = {}
        self.clock.gaps.clear()
        for round_ in range(a.rounds + 1):  # round 0 warms up
            for name, run in (contenders.items() if round_ % 2 else reversed(contenders.items())):
                wall, out = run()
                outputs[name] = out[0]
                if round_:
                    samples[name].append(len(out[0]) / wall)
            if round_ == 0:
                self.clock.gaps.clear()
        engine_step = statistics.median(self.clock.gaps)
        generate_steps = np.diff(in_worker(peftkit_generate)[1])
        peftkit.activate(self.model, "a0")
        try:
            with_adapter = in_worker(lambda: self.bare_step(request.prompt, a.single_tokens))
        finally:
            peftkit.activate(self.model, [])
        with peftkit.disabled(self.model):
            bare = in_worker(lambda: self.bare_step(request.prompt, a.single_tokens))
        rows = {name: {"tokens": len(outputs[name]), "tokens_per_s": statistics.median(s), "samples": s}
                for name, s in samples.items()}
        for name, row in rows.items():
            row["vs_engine"] = row["tokens_per_s"] / rows["engine"]["tokens_per_s"]
            print(f"  {name}: {row['tokens_per_s']:.2f} tokens/s ({row['tokens']} tokens)", flush=True)
        fastest = max(r["tokens_per_s"] for n, r in rows.items() if n != "engine")
        step = {"engine_step_ms": 1e3 * engine_step, "generate_step_ms": 1e3 * float(np.median(generate_steps)),
                "forward_with_adapter_ms": 1e3 * with_adapter, "forward_base_ms": 1e3 * bare,
                "engine_overhead_ms": 1e3 * (engine_step - with_adapter)}
        print(f"  per step: {json.dumps({k: round(v, 1) for k, v in step.items()})}", flush=True)
        return {"max_tokens": a.single_tokens, "contenders": rows, "step": step,
                "same_outputs_as_engine": {n: outputs[n] == outputs["engine"] for n in outputs},
                "target": {"engine_vs_generate": 1.0, "met": rows["engine"]["tokens_per_s"] >= fastest}}

    def section_registered(self) -> dict[str, Any]:
        a = self.args
        dialogues_ = self.workload(a.registered_requests, a.max_tokens, ["a0"] * a.registered_requests)
        engines, requests = {}, {}
        for count in (10, 1000):  # names <count>-0..7 in use; the names point at the 64 saved directories in turn
            store = self.store({f"{count}-{i}": f"a{i % ADAPTERS}" for i in range(count)})
            engines[count] = Engine(self.model, self.tokenizer, store, max_batch=64)
            requests[count] = [Request(r.prompt, r.max_tokens, f"{count}-{i % 8}") for i, r in enumerate(dialogues_)]
        samples: dict[int, list[float]] = defaultdict(list)
        for round_ in range(a.rounds + 1):  # round 0 loads the 8 and warms up; then 10, 1000 / 1000, 10 / ...
            for count in ((10, 1000) if round_ % 2 else (1000, 10)):
                wall, outputs = engine_closed(engines[count], requests[count])
                if round_:
                    samples[count].append(sum(map(len, outputs)) / wall)
        rows = {f"{c} registered": {"tokens_per_s": statistics.median(s), "samples": s} for c, s in samples.items()}
        ratio = rows["1000 registered"]["tokens_per_s"] / rows["10 registered"]["tokens_per_s"]
        print(f"  tokens/s: {json.dumps({k: round(v['tokens_per_s'], 1) for k, v in rows.items()})}, "
              f"1000/10 = {ratio:.3f}", flush=True)
        return {"requests": a.registered_requests, "in_use": 8, "contenders": rows, "ratio_1000_vs_10": ratio,
                "store": "AdapterStore (no limits); each contender's own store and names, the 8 loaded in round 0",
                "target": {"within": 0.05, "met": abs(ratio - 1) <= 0.05}}

    def section_http(self) -> dict[str, Any]:
        """The same chat requests through the HTTP app (streamed, as clients mostly ask) and through the engine."""
        a = self.args
        asked = questions(a.http_requests)
        adapters = [f"a{i % 8}" for i in range(a.http_requests)]
        requests = [Request(self.engine.chat_ids([{"role": "user", "content": q["question"]}]), a.max_tokens, name)
                    for q, name in zip(asked, adapters)]
        bodies = [{"model": name, "messages": [{"role": "user", "content": q["question"]}], "max_tokens": a.max_tokens,
                   "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
                  for q, name in zip(asked, adapters)]
        samples: dict[str, list[float]] = defaultdict(list)
        counts = {}
        for round_ in range(a.rounds + 1):  # round 0 warms up
            for name in (("engine", "HTTP") if round_ % 2 else ("HTTP", "engine")):
                wall, tokens = engine_closed(self.engine, requests) if name == "engine" else http_closed(
                    self.engine, self.engine.store, bodies)
                counts[name] = sum(map(len, tokens)) if name == "engine" else tokens
                if round_:
                    samples[name].append(counts[name] / wall)
        if counts["HTTP"] != counts["engine"]:  # greedy, same prompts: the same tokens either way
            raise RuntimeError(f"HTTP produced {counts['HTTP']} tokens, the engine {counts['engine']}")
        rows = {n: {"tokens_per_s": statistics.median(s), "tokens": counts[n], "samples": s} for n, s in samples.items()}
        ratio = rows["HTTP"]["tokens_per_s"] / rows["engine"]["tokens_per_s"]
        print(f"  tokens/s: {json.dumps({k: round(v['tokens_per_s'], 1) for k, v in rows.items()})}, "
              f"HTTP/engine = {ratio:.3f}", flush=True)
        return {"requests": a.http_requests, "max_tokens": a.max_tokens, "contenders": rows, "ratio_http_vs_engine":
                ratio, "target": {"at_least": 0.9, "met": ratio >= 0.9}}

    def decode_iterations(self, requests: list[Request]) -> list[float]:
        """Seconds of each engine iteration with every row decoding (all 64 rows admitted and prefilled; EOS off,
        so rows run to max_tokens)."""
        self.clock.iterations.clear()
        engine_closed(self.engine, requests)
        marks = self.clock.iterations
        full = [i for i, (_, running, waiting) in enumerate(marks) if running == len(requests) and waiting == 0]
        # skip the iteration that admitted the last row and the next (it may finish that row's prefill)
        steady = [i for i in full[2:] if i - 1 in full]
        return [marks[i][0] - marks[i - 1][0] for i in steady]

    def section_mix(self) -> dict[str, Any]:
        a = self.args
        sets = {"64 LoRA": [f"a{i}" for i in range(ADAPTERS)], "16 LoRA + 16 (IA)3 + 16 prefix + 16 bottleneck":
                save_mix(self.model, self.folder)}
        for name in sets[list(sets)[1]][ADAPTERS // 4:]:
            self.engine.store.register(name, name)
        requests = {name: self.workload(ADAPTERS, a.mix_tokens, adapters, fixed=a.mix_tokens)
                    for name, adapters in sets.items()}
        eos, self.engine.eos = self.engine.eos, set()
        samples: dict[str, list[float]] = defaultdict(list)
        try:
            engine_closed(self.engine, [Request(r.prompt, 2, r.adapter) for r in requests[list(sets)[1]]])  # loads
            for round_ in range(a.rounds):
                for name in (list(sets) if round_ % 2 == 0 else list(reversed(sets))):
                    samples[name] += self.decode_iterations(requests[name])
        finally:
            self.engine.eos = eos
        rows = {name: {"step_ms": 1e3 * statistics.median(s), "iterations": len(s),
                       "iqr_ms": 1e3 * float(np.subtract(*np.percentile(s, [75, 25])))} for name, s in samples.items()}
        lora, mix = (rows[name]["step_ms"] for name in sets)
        print(f"  decode step ms: {json.dumps({k: round(v['step_ms'], 1) for k, v in rows.items()})}, "
              f"mix/LoRA = {mix / lora:.3f}", flush=True)
        return {"rows": ADAPTERS, "max_tokens": a.mix_tokens, "contenders": rows, "ratio_mix_vs_lora": mix / lora,
                "target": {"ratio": 1.2, "met": mix / lora <= 1.2}}

    # --- open loop -------------------------------------------------------------------------------------------------

    def engine_open_loop(self, requests: list[Request], arrivals: np.ndarray) -> list[Timing]:
        """Each request submitted at its arrival time; a consumer thread per request timestamps its events."""
        timings = [Timing(0.0) for _ in requests]

        def consume(handle, timing: Timing) -> None:
            for event in handle:
                now = time.perf_counter()
                if isinstance(event, FinishEvent):
                    timing.end, timing.tokens = now, event.completion_tokens
                    timing.error = event.error if event.reason == "error" else None
                else:
                    timing.first = timing.first or now
                    timing.last = now

        consumers = []
        self.engine.start()
        try:
            start = time.perf_counter()
            for request, arrival, timing in zip(requests, arrivals, timings):
                timing.arrival = start + arrival
                time.sleep(max(0.0, timing.arrival - time.perf_counter()))
                try:
                    handle = self.engine.submit(GenerationRequest(request.prompt, request.adapter,
                                                                  greedy(request.max_tokens)))
                except ServeError as error:
                    timing.error, timing.end = f"{type(error).__name__}: {error}", time.perf_counter()
                    continue
                consumers.append(threading.Thread(target=consume, args=(handle, timing)))
                consumers[-1].start()
            for consumer in consumers:
                consumer.join()
        finally:
            self.engine.stop()
        return timings

    def switching_open_loop(self, requests: list[Request], arrivals: np.ndarray) -> list[Timing]:
        """A server loop on `set_adapter`: take what has arrived, group by adapter (FCFS), `generate` per group.
        A token counts as delivered when its step ends (as if streamed), a request ends with its last token."""
        start = time.perf_counter()
        timings = [Timing(start + arrival) for arrival in arrivals]
        served = 0

        def record(indices: list[int], tokens: list[list[int]], steps: list[float]) -> None:
            for i, output in zip(indices, tokens):
                timing = timings[batch[i]]
                timing.tokens = len(output)
                if output:
                    timing.first, timing.last = steps[0], steps[len(output) - 1]
                timing.end = steps[max(len(output), 1) - 1]

        while served < len(requests):
            now = time.perf_counter()
            batch = [i for i in range(served, len(requests)) if timings[i].arrival <= now]
            if not batch:
                time.sleep(timings[served].arrival - now)
                continue
            switching_batch(self.peft_model, [requests[i] for i in batch], self.pad, self.eos, on_group=record)
            served = batch[-1] + 1
        return timings

    def section_open_loop(self) -> dict[str, Any]:
        a = self.args
        rng = np.random.default_rng(0)
        contenders = {"engine": self.engine_open_loop,
                      "adapter switching": lambda *run: in_worker(lambda: self.switching_open_loop(*run))}
        results: dict[str, dict[str, Any]] = {}
        for kind in POPULARITY:
            requests = self.workload(a.requests, a.open_tokens, popularity(kind, a.requests, rng))
            arrivals = np.cumsum(rng.exponential(1 / a.rate, a.requests))
            results[kind] = {}
            for name, run in contenders.items():
                results[kind][name] = summarize(run(requests, arrivals))
                print(f"  {kind:10s} {name:18s} {brief(results[kind][name])}", flush=True)
        plot_open_loop(results, a.output / "open-loop.png", a.rate)
        return {"requests": a.requests, "rate": a.rate, "max_tokens_cap": a.open_tokens, "results": results}

    def steady(self) -> dict[str, Any]:
        """The engine alone under Poisson load for --steady seconds (uniform popularity): failures, RSS over time."""
        a = self.args
        count = int(a.rate * a.steady * 1.2) + 10
        rng = np.random.default_rng(1)
        arrivals = np.cumsum(rng.exponential(1 / a.rate, count))
        count = int(np.searchsorted(arrivals, a.steady))
        requests = self.workload(count, a.open_tokens, popularity("uniform", count, rng))
        rss: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            start = time.perf_counter()
            while not done.wait(5.0 if rss else 0.0):
                rss.append((time.perf_counter() - start, rss_mib()))
            rss.append((time.perf_counter() - start, rss_mib()))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            timings = self.engine_open_loop(requests, arrivals[:count])
        finally:
            done.set()
            sampler.join()
        result = summarize(timings)
        result.update(seconds=a.steady, rate=a.rate, rss_mib=rss)
        print(f"  steady {a.steady} s at {a.rate}/s: {brief(result)}; RSS {rss[0][1]:.0f} -> {rss[-1][1]:.0f} MiB "
              f"(max {max(r for _, r in rss):.0f})", flush=True)
        plot_rss(rss, a.output / "rss.png")
        return result


# --- metrics, plots, report ----------------------------------------------------------------------------------------


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def summarize(timings: list[Timing]) -> dict[str, Any]:
    ok = [t for t in timings if t.error is None and t.end is not None]
    answered = [t for t in ok if t.first is not None]
    span = max(t.end for t in ok) - min(t.arrival for t in timings) if ok else float("nan")
    return {"requests": len(timings), "failed": len(timings) - len(ok), "tokens": sum(t.tokens for t in ok),
            "tokens_per_s": sum(t.tokens for t in ok) / span, "seconds": span,
            "ttft_s": percentiles([t.first - t.arrival for t in answered]),
            "tpot_s": percentiles([(t.last - t.first) / (t.tokens - 1) for t in answered if t.tokens > 1]),
            "e2e_s": percentiles([t.end - t.arrival for t in ok]),
            "errors": sorted({t.error for t in timings if t.error})[:5]}


def fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


def brief(r: dict[str, Any]) -> str:
    return (f"{r['tokens_per_s']:.1f} tokens/s, TTFT p50/p99 {fmt(r['ttft_s']['p50'])}/{fmt(r['ttft_s']['p99'])} s, "
            f"TPOT {fmt(r['tpot_s']['p50'], 1e3, 0)}/{fmt(r['tpot_s']['p99'], 1e3, 0)} ms, "
            f"e2e {fmt(r['e2e_s']['p50'])}/{fmt(r['e2e_s']['p99'])} s, failed {r['failed']}")


def plot_open_loop(results: dict[str, dict[str, Any]], path: Path, rate: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("output tokens/s", lambda r, p: r["tokens_per_s"], ("",)),
              ("TTFT (s)", lambda r, p: r["ttft_s"][p], ("p50", "p99")),
              ("TPOT (s)", lambda r, p: r["tpot_s"][p], ("p50", "p99")),
              ("end-to-end (s)", lambda r, p: r["e2e_s"][p], ("p50", "p99"))]
    contenders = list(next(iter(results.values())))
    figure, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    x = np.arange(len(results))
    for axis, (title, value, stats) in zip(axes, panels):
        bars = [(c, s) for c in contenders for s in stats]
        width = 0.8 / len(bars)
        for k, (contender, stat) in enumerate(bars):
            heights = [value(results[kind][contender], stat) or 0 for kind in results]
            axis.bar(x + (k - (len(bars) - 1) / 2) * width, heights, width,
                     label=f"{contender} {stat}".strip(), hatch="//" if stat == "p99" else None,
                     color=f"C{contenders.index(contender)}", alpha=0.6 if stat == "p99" else 1.0)
        axis.set_xticks(x, list(results))
        axis.set_title(title)
        if title != "output tokens/s":
            axis.set_yscale("log")
        axis.legend(fontsize=7)
    figure.suptitle(f"SmolLM2-135M, 64 LoRA adapters, Poisson arrivals at {rate:g} requests/s, CPU 2 threads")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_rss(rss: list[tuple[float, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot([t for t, _ in rss], [m for _, m in rss])
    axis.set_xlabel("seconds")
    axis.set_ylabel("RSS (MiB)")
    axis.set_title("engine under steady load: resident memory")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def verdict(target: dict[str, Any]) -> str:
    return "**met**" if target["met"] else "**missed**"


def report(results: dict[str, Any], command: str, env: dict[str, Any]) -> str:
    lines = [f"{datetime.date.today()} · `{command}` · torch {env['torch']}, transformers {env['transformers']}, "
             f"peft {env['peft']}, {env['threads']} threads on {env['cpu_count']} CPUs; load average at start "
             f"{', '.join(f'{v:.1f}' for v in env['loadavg_start'])}. Other processes' CPU share per section "
             "in brackets: above ~10% the machine was contended and absolute numbers are low; compare within a "
             "section.", ""]
    checks = results.get("checks")
    if checks:
        lines += [f"Same adapter files in both libraries: max |peftkit − peft| logits "
                  f"{checks['peftkit_vs_peft']:.1e}; the adapter moves them by up to "
                  f"{checks['peftkit_vs_base']:.2f} from the base's.", ""]
    section = results.get("64-adapters")
    if section:
        rows, target = section["contenders"], section["target"]
        lines += [f"### 64 concurrent requests over 64 LoRA adapters, max_tokens {section['max_tokens']} "
                  f"[{section['foreign']:.0%}]", "", "| contender | output tokens | seconds | tokens/s | × adapter "
                  "switching | outputs equal to the engine's |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {n} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | {r['vs_switching']:.2f} | "
                  f"{r['same_outputs_as_engine']}/{section['requests']} |" for n, r in rows.items()]
        lines += ["", f"Target engine ≥ 8× adapter switching: {rows['engine']['vs_switching']:.2f}× — "
                      f"{verdict(target)}.", ""]
    section = results.get("single")
    if section:
        rows, step = section["contenders"], section["step"]
        lines += [f"### One request alone, max_tokens {section['max_tokens']} [{section['foreign']:.0%}]", "",
                  "| contender | tokens | tokens/s (median) | × engine |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {r['tokens']} | {r['tokens_per_s']:.2f} | {r['vs_engine']:.3f} |" for n, r in rows.items()]
        lines += ["", f"Per decode step (medians): engine {step['engine_step_ms']:.1f} ms, `generate` "
                      f"{step['generate_step_ms']:.1f} ms, bare forward at batch 1 with a DynamicCache "
                      f"{step['forward_with_adapter_ms']:.1f} ms with the adapter active "
                      f"({step['forward_base_ms']:.1f} ms base): engine overhead "
                      f"{step['engine_overhead_ms']:.1f} ms per step. Target engine ≥ generate: "
                      f"{verdict(section['target'])}.", ""]
    section = results.get("registered")
    if section:
        rows = section["contenders"]
        lines += [f"### 1,000 registered adapters vs 10, the same 8 in use, {section['requests']} requests "
                  f"[{section['foreign']:.0%}]", "", "| store | tokens/s (median) | runs |", "|---|---:|---|"]
        lines += [f"| {n} | {r['tokens_per_s']:.1f} | {', '.join(f'{s:.1f}' for s in r['samples'])} |"
                  for n, r in rows.items()]
        lines += ["", f"1000 / 10 = {section['ratio_1000_vs_10']:.3f}; target within 5%: "
                      f"{verdict(section['target'])}. Store: {section['store']}.", ""]
    section = results.get("http")
    if section:
        rows = section["contenders"]
        lines += [f"### Through HTTP vs the engine in Python: {section['requests']} streamed chat completions over 8 "
                  f"adapters at once, max_tokens {section['max_tokens']} [{section['foreign']:.0%}]", "",
                  "| path | tokens/s (median) | runs |", "|---|---:|---|"]
        lines += [f"| {n} | {r['tokens_per_s']:.1f} | {', '.join(f'{s:.1f}' for s in r['samples'])} |"
                  for n, r in rows.items()]
        lines += ["", f"HTTP / engine = {section['ratio_http_vs_engine']:.3f}; target ≥ 0.9: "
                      f"{verdict(section['target'])}.", ""]
    section = results.get("mix")
    if section:
        rows = section["contenders"]
        lines += [f"### Decode step with 64 running rows [{section['foreign']:.0%}]", "",
                  "| adapters | step ms (median) | IQR ms | iterations |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {r['step_ms']:.1f} | {r['iqr_ms']:.1f} | {r['iterations']} |" for n, r in rows.items()]
        lines += ["", f"mix / LoRA = {section['ratio_mix_vs_lora']:.3f}; target ≤ 1.2: {verdict(section['target'])}.",
                  ""]
    section = results.get("open-loop")
    if section:
        lines += [f"### Open loop: {section['requests']} requests per run, Poisson at {section['rate']:g}/s, output "
                  f"lengths = chatterbot answers capped at {section['max_tokens_cap']} [{section['foreign']:.0%}]", "",
                  "| popularity | contender | tokens/s | TTFT p50 / p99 s | TPOT p50 / p99 ms | e2e p50 / p99 s | "
                  "failed |", "|---|---|---:|---:|---:|---:|---:|"]
        for kind, contenders in section["results"].items():
            for name, r in contenders.items():
                lines.append(f"| {kind} | {name} | {r['tokens_per_s']:.1f} | {fmt(r['ttft_s']['p50'])} / "
                             f"{fmt(r['ttft_s']['p99'])} | {fmt(r['tpot_s']['p50'], 1e3, 0)} / "
                             f"{fmt(r['tpot_s']['p99'], 1e3, 0)} | {fmt(r['e2e_s']['p50'])} / "
                             f"{fmt(r['e2e_s']['p99'])} | {r['failed']} |")
        lines += ["", "Adapter switching's token times are its `generate` steps' ends (as if it streamed), so its "
                      "TTFT and end-to-end are a lower bound for a server that returns whole `generate` results.",
                  "", "![open loop](open-loop.png)", ""]
    section = results.get("steady")
    if section:
        rss = [m for _, m in section["rss_mib"]]
        lines += [f"### Steady load: {section['seconds']} s at {section['rate']:g} requests/s (engine) "
                  f"[{section['foreign']:.0%}]", "", f"{section['requests']} requests, {section['failed']} failed; "
                  f"{brief(section)}. RSS {rss[0]:.0f} MiB at the start, {rss[-1]:.0f} at the end, max "
                  f"{max(rss):.0f}.", "", "![rss](rss.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens, requests and rounds (a few minutes)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--rate", type=float, default=2.0, help="open loop / steady: arrivals per second")
    parser.add_argument("--requests", type=int, help="open loop: requests per run (default 40, quick 16)")
    parser.add_argument("--steady", type=float, metavar="SECONDS", help="only a steady-load run of the engine")
    parser.add_argument("--output", type=Path, default=Path("runs/bench-serve"))
    args = parser.parse_args()
    quick = args.quick
    args.output = args.output / ("quick" if quick else "full")
    args.max_tokens = 8 if quick else 32  # 64-adapters, registered
    args.single_tokens = 24 if quick else 64
    args.mix_tokens = 16 if quick else 24
    args.open_tokens = 12 if quick else 32
    args.rounds = 1 if quick else 3
    args.registered_requests = args.http_requests = 32
    args.requests = args.requests or (16 if quick else 40)
    args.output.mkdir(parents=True, exist_ok=True)
    env = setup_environment()

    model, tokenizer = load_smollm2()
    peft_base, _ = load_smollm2()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        peft_model = make_adapters(peft_base, folder)
        bench = Bench(args, model.eval(), peft_model, tokenizer, folder)
        try:
            text = run_sections(bench, args, env)
        finally:
            bench.close()
    print(text)


def run_sections(bench: Bench, args: argparse.Namespace, env: dict[str, Any]) -> str:
    bench.load_all()
    results: dict[str, Any] = {"environment": env, "checks": bench.check_adapters()}
    print(f"checks: {results['checks']}", flush=True)
    sections = {"64-adapters": bench.section_64_adapters, "single": bench.section_single,
                "registered": bench.section_registered, "http": bench.section_http, "mix": bench.section_mix,
                "open-loop": bench.section_open_loop, "steady": bench.steady}
    for name in ["steady"] if args.steady else [name for name in SECTIONS if name in args.only]:
        print(f"{name}:", flush=True)
        before, start = _cpu_counters(), time.perf_counter()
        results[name] = sections[name]()
        results[name]["foreign"] = _foreign_share(before, _cpu_counters())
        results[name]["wall_s"] = time.perf_counter() - start
        text = write(args.output, results, env)  # after every section: a long run keeps what it measured
    return text


def write(output: Path, results: dict[str, Any], env: dict[str, Any]) -> str:
    command = " ".join(["python benchmarks/bench_serve.py", shlex.join(sys.argv[1:])]).strip()
    text = report(results, command, env)
    for name, content in (("results.json", json.dumps(results, indent=1, default=str)), ("report.md", text)):
        (output / f"{name}.tmp").write_text(content)
        (output / f"{name}.tmp").replace(output / name)
    return text


if __name__ == "__main__":
    main()
