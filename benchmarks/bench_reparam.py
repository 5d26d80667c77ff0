"""DoRA, VeRA and AdaLoRA: peftkit vs Hugging Face PEFT on MiniLM-L6 (CPU), and LoRA-FA's memory.

Scenarios (see benchmarks/README.md), each on its own copies of the same weights and inputs:
  train-<method>   <method> on query, value + trainable classifier, batch 16 x seq 128: one step =
                   forward + backward + AdamW step (AdaLoRA: + the orthogonality regularizer and the
                   per-step rank allocation, which users must call): peftkit vs peft, ratio peftkit / peft.
  infer-<method>   the same adapter on BertModel, unmerged, inference_mode, batch 32 x seq 128:
                   base alone vs peftkit vs peft (ratios to base and to peft).
  memory-lorafa    LoRA vs LoRA-FA on every linear layer (r=8) + classifier, batch 16 x seq 128, one
                   training step: bytes autograd saves for backward, and the peak of the step's CPU
                   allocations (peftkit and, as a cross-check, peft's LoRA with create_lorafa_optimizer).
Methods: DoRA(r=8, alpha=16) vs LoraConfig(use_dora=True); VeRA(r=256) vs VeraConfig(r=256);
AdaLoRA(init_r=12, target_r=4) vs AdaLoraConfig(...).

Timing, model loading and the /proc/stat filter of rounds with foreign CPU load are bench_lora.py's.
Before timing, every scenario copies peftkit's adapter tensors (random, so the adapter really acts)
into peft and prints the max abs difference of the outputs, and of peftkit vs the base.

    python benchmarks/bench_reparam.py               # full run (about 2.5 min on 2 idle cores)
    python benchmarks/bench_reparam.py --quick       # fewer repeats
    python benchmarks/bench_reparam.py --json out.json --only infer-dora --profile
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import peftkit
from peftkit.core.delta import ModuleCopy
from bench_lora import (SEED, agreement, common_parser, copy_peftkit_to_peft, hidden_state_runner, interleaved,
                        load_minilm, make_inputs, parse_rounds, peft_lora_layer, profile, randomize_peftkit,
                        ratios_to_base, run_scenarios, trainable)

TARGETS = ["query", "value"]
LABELS = 5
ADALORA_TOTAL_STEP = 1000  # far beyond the steps timed: every timed step smooths the scores and allocates

# ----------------------------------------------------------------------------- the three methods


def _deltas(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """host name -> that host's delta of adapter `name` (task-head copies left out)."""
    reg = model.__dict__["_peftkit_registry"]
    found = {host: getattr(model.get_submodule(host), "peftkit")[name] for host in reg.hosts[name]}
    return {host: d for host, d in found.items() if not isinstance(d, ModuleCopy)}


@torch.no_grad()
def _randomize_dora(model: nn.Module, gen: torch.Generator) -> None:
    randomize_peftkit(model, "a", gen)
    for delta in _deltas(model, "a").values():  # m ≠ ‖W0 + sBA‖: the rows really rescale
        delta.magnitude.mul_(1 + 0.2 * torch.randn(delta.magnitude.shape, generator=gen))


@torch.no_grad()
def _copy_dora(model: nn.Module, peft_model: nn.Module) -> int:
    copy_peftkit_to_peft(model, "a", peft_model, "default")
    for host, delta in _deltas(model, "a").items():
        peft_lora_layer(peft_model, host).lora_magnitude_vector["default"].weight.copy_(delta.magnitude)
    return len(_deltas(model, "a"))


@torch.no_grad()
def _randomize_vera(model: nn.Module, gen: torch.Generator) -> None:
    for delta in _deltas(model, "a").values():  # b = 0 at init would make the adapter a no-op
        delta.vera_lambda_b.copy_(torch.randn(delta.vera_lambda_b.shape, generator=gen) * 0.1)
        delta.vera_lambda_d.mul_(1 + 0.2 * torch.randn(delta.vera_lambda_d.shape, generator=gen))


@torch.no_grad()
def _copy_vera(model: nn.Module, peft_model: nn.Module) -> int:
    for host, delta in _deltas(model, "a").items():
        layer = peft_lora_layer(peft_model, host)
        a, b = delta.projections()  # both libraries draw A, B from the same seed: check, do not copy
        assert torch.equal(layer.vera_A["default"][:, :layer.in_features], a)
        assert torch.equal(layer.vera_B["default"][:layer.out_features], b)
        layer.vera_lambda_b["default"].copy_(delta.vera_lambda_b)
        layer.vera_lambda_d["default"].copy_(delta.vera_lambda_d)
    return len(_deltas(model, "a"))


@torch.no_grad()
def _randomize_adalora(model: nn.Module, gen: torch.Generator) -> None:
    randomize_peftkit(model, "a", gen)
    for delta in _deltas(model, "a").values():  # Λ = 0 at init would make the adapter a no-op
        delta.lora_E.copy_(torch.randn(delta.lora_E.shape, generator=gen))


@torch.no_grad()
def _copy_adalora(model: nn.Module, peft_model: nn.Module) -> int:
    for host, delta in _deltas(model, "a").items():
        layer = peft_lora_layer(peft_model, host)
        for name in ("lora_A", "lora_B", "lora_E"):  # PEFT keeps them as bare parameters, same layouts
            getattr(layer, name)["default"].copy_(getattr(delta, name))
        peft_scaling = layer.scaling["default"] / (layer.ranknum["default"].item() + 1e-5)
        assert abs(peft_scaling - delta.scaling) < 1e-6, (peft_scaling, delta.scaling)
    return len(_deltas(model, "a"))


@dataclass
class Method:
    """One method in both libraries: how to build it, make it non-trivial, and copy peftkit's tensors to peft."""

    ours: Callable[..., peftkit.AdapterConfig]  # (modules_to_save=...) -> peftkit config
    theirs: Callable[..., object]  # (task_type=...) -> peft config
    randomize: Callable[[nn.Module, torch.Generator], None]
    copy: Callable[[nn.Module, nn.Module], int]


def _methods() -> dict[str, Method]:
    from peft import AdaLoraConfig, LoraConfig, VeraConfig

    return {
        "dora": Method(
            lambda **kw: peftkit.DoRA(r=8, alpha=16, targets=TARGETS, **kw),
            lambda **kw: LoraConfig(use_dora=True, r=8, lora_alpha=16, target_modules=TARGETS, **kw),
            _randomize_dora, _copy_dora),
        "vera": Method(
            lambda **kw: peftkit.VeRA(r=256, targets=TARGETS, **kw),
            lambda **kw: VeraConfig(r=256, target_modules=TARGETS, **kw),
            _randomize_vera, _copy_vera),
        "adalora": Method(
            lambda **kw: peftkit.AdaLoRA(init_r=12, target_r=4, total_step=ADALORA_TOTAL_STEP, targets=TARGETS, **kw),
            lambda **kw: AdaLoraConfig(init_r=12, target_r=4, total_step=ADALORA_TOTAL_STEP, target_modules=TARGETS, **kw),
            _randomize_adalora, _copy_adalora),
    }


def _attach_both(method: str, base: nn.Module, classify: bool) -> tuple[nn.Module, nn.Module, dict[str, float]]:
    """peftkit and peft copies of `base` with the same random adapter; the outputs compared (eval mode)."""
    from peft import get_peft_model

    spec = _methods()[method]
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)  # same classifier init for both
    peftkit.attach(ours, spec.ours(modules_to_save=["classifier"] if classify else []), name="a")
    theirs = get_peft_model(theirs, spec.theirs(task_type="SEQ_CLS" if classify else None))
    spec.randomize(ours, torch.Generator().manual_seed(2))
    copied = spec.copy(ours, theirs)
    inputs = make_inputs(4, 128, base.config.vocab_size, seed=SEED + 7)
    outs = {}
    for who, model in (("base", base), ("peftkit", ours), ("peft", theirs)):
        model.eval()
        with torch.no_grad():
            outs[who] = model(**inputs, output_hidden_states=True)
    hidden = {who: out.hidden_states[-1] for who, out in outs.items()}  # the encoder's output, before any head
    check = {"hosts": copied, **agreement(hidden)}
    if classify:
        check["max_abs_diff_logits_peftkit_vs_peft"] = (outs["peftkit"].logits - outs["peft"].logits).abs().max().item()
    return ours, theirs, check


# ----------------------------------------------------------------------------- scenarios


def bench_train(method: str, args) -> dict:
    torch.manual_seed(SEED)
    base = load_minilm(num_labels=LABELS)
    ours, theirs, check = _attach_both(method, base, classify=True)
    del base
    n_ours, n_theirs = trainable(ours), trainable(theirs)
    assert n_ours == n_theirs, f"trainable parameters differ: peftkit {n_ours} vs peft {n_theirs}"
    check["trainable_params"] = n_ours
    print(f"[train-{method}] check: {check}", flush=True)
    opt_ours = torch.optim.AdamW(list(peftkit.adapter_parameters(ours, "a")), lr=1e-4)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)
    inputs = make_inputs(16, 128, ours.config.vocab_size)
    labels = torch.randint(0, LABELS, (16,), generator=torch.Generator().manual_seed(1))
    regularize, allocate_ours, allocate_theirs = None, None, None
    if method == "adalora":  # peft adds the orthogonality term to the loss inside forward; peftkit leaves it to the user
        controller = peftkit.AdaLoRAController(ours, "a")
        regularize, allocate_ours, allocate_theirs = controller.regularizer, controller.update, theirs.base_model.update_and_allocate
    ours.train(), theirs.train()

    def step(model, opt, allocate, regularize=None):
        count = 0

        def run():
            nonlocal count
            count += 1
            opt.zero_grad(set_to_none=True)
            loss = model(**inputs, labels=labels).loss
            if regularize is not None:
                loss = loss + regularize()
            loss.backward()
            opt.step()
            if allocate is not None:  # after the optimizer step, before zero_grad: it reads the gradients
                allocate(count)
        return run

    contenders = {"peftkit": step(ours, opt_ours, allocate_ours, regularize), "peft": step(theirs, opt_theirs, allocate_theirs)}
    t, rounds = interleaved(contenders, args.warmup, args.repeats, args.max_foreign)
    what = "fwd+bwd+AdamW" + (" + orth. reg. + update_and_allocate" if method == "adalora" else "")
    res = {"scenario": f"train-{method}", "desc": f"train {method}, q,v + classifier; {what}; batch 16 x seq 128",
           "check": check, "timings": t, "rounds": rounds, "ref": "peft",
           "ratio_peftkit_over_peft": t["peftkit"]["median_ms"] / t["peft"]["median_ms"],
           "paired_ratio_quartiles": _paired_ratio_quartiles(t["peftkit"], t["peft"])}
    if args.profile:
        res["profile"] = {k: profile(f, f"train-{method}/{k}") for k, f in contenders.items()}
    return res


def bench_infer(method: str, args) -> dict:
    torch.manual_seed(SEED)
    base = load_minilm().eval()
    ours, theirs, check = _attach_both(method, base, classify=False)
    print(f"[infer-{method}] check: {check}", flush=True)
    inputs = make_inputs(args.infer_batch, 128, base.config.vocab_size)

    contenders = {who: hidden_state_runner(m, inputs) for who, m in (("base", base), ("peftkit", ours), ("peft", theirs))}
    t, rounds = interleaved(contenders, args.warmup, args.repeats, args.max_foreign)
    res = {"scenario": f"infer-{method}", "check": check, "timings": t, "rounds": rounds, "ref": "base",
           "desc": f"infer {method}, q,v unmerged, inference_mode; batch {args.infer_batch} x seq 128",
           **ratios_to_base(t),
           "ratio_peftkit_over_peft": t["peftkit"]["median_ms"] / t["peft"]["median_ms"],
           "paired_ratio_quartiles": _paired_ratio_quartiles(t["peftkit"], t["peft"])}
    if args.profile:
        res["profile"] = {k: profile(f, f"infer-{method}/{k}") for k, f in contenders.items()}
    return res


def _allocation_peak(fn: Callable[[], object]) -> int | None:
    """Peak bytes of CPU tensor memory allocated during fn() and alive at once (None if torch lacks the API).

    The profiler with profile_memory records every allocation and free of the CPU allocator in
    order, with the running total of what it has seen allocated; the peak of that total above
    its value before the first allocation is exact and the same on every run (sizes do not
    depend on timing). It includes everything the step allocates: activations, gradients,
    optimizer temporaries.
    """
    from torch.profiler import ProfilerActivity, profile as tprofile

    try:
        from torch._C._profiler import _EventType  # private: the public API only sums per op
    except ImportError:
        return None
    with tprofile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.total_allocated, event.extra_fields.alloc_size))
    allocations.sort()
    start = allocations[0][1] - allocations[0][2]
    return max(total for _, total, _ in allocations) - start


def _saved_for_backward(fn: Callable[[], object], model: nn.Module) -> int:
    """Bytes autograd keeps for backward during fn(), each storage once, the model's own tensors left out.

    Counted at pack time through saved_tensors_hooks, by storage (views of one tensor share it,
    and memory holds whole storages). Weights saved for the input gradient are the model's
    anyway, so they are excluded: what remains is activation memory, which LoRA-FA targets.
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def bench_memory(args) -> dict:
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_lorafa_optimizer

    torch.manual_seed(SEED)
    base = load_minilm(num_labels=LABELS)
    inputs = make_inputs(16, 128, base.config.vocab_size)
    labels = torch.randint(0, LABELS, (16,), generator=torch.Generator().manual_seed(1))
    models: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for who, config in (("peftkit LoRA", peftkit.LoRA), ("peftkit LoRA-FA", peftkit.LoRAFA)):
        model = peftkit.attach(copy.deepcopy(base), config(r=8, alpha=16, targets="all-linear", exclude=["classifier"],
                                                           modules_to_save=["classifier"]), name="a")
        models[who] = model, torch.optim.AdamW(list(peftkit.adapter_parameters(model, "a")), lr=1e-4)
    hosts = models["peftkit LoRA"][0].__dict__["_peftkit_registry"].hosts["a"]
    hosts = [h for h in hosts if h != "classifier"]
    for who in ("peft LoRA", "peft LoRA-FA"):  # peft's LoRA-FA is an optimizer that freezes lora_A
        model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", target_modules=hosts, r=8, lora_alpha=16))
        opt = (create_lorafa_optimizer(model, r=8, lora_alpha=16, lr=1e-4) if who.endswith("FA")
               else torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
        models[who] = model, opt
    del base
    rows = {}
    for who, (model, opt) in models.items():
        model.train()

        def run():
            opt.zero_grad(set_to_none=True)
            model(**inputs, labels=labels).loss.backward()
            opt.step()

        run()  # the optimizer's state exists from the first step on: measure a steady-state step
        rows[who] = {"trainable_params": trainable(model), "saved_for_backward_bytes": _saved_for_backward(run, model),
                     "step_peak_bytes": _allocation_peak(run)}
    print(f"[memory-lorafa] {len(hosts)} LoRA hosts; {rows}", flush=True)
    for lib in ("peftkit", "peft"):
        fa, lora = rows[f"{lib} LoRA-FA"], rows[f"{lib} LoRA"]
        for key in ("saved_for_backward_bytes", "step_peak_bytes"):
            fa[key.replace("bytes", "ratio")] = fa[key] / lora[key] if fa[key] is not None else None
    return {"scenario": "memory-lorafa", "desc": f"memory, LoRA vs LoRA-FA r=8 on all {len(hosts)} linear layers + classifier; "
            "one training step, batch 16 x seq 128", "rows": rows}


def _paired_ratio_quartiles(a: dict, b: dict) -> list[float]:
    """Quartiles of a's time / b's time within each kept round: interleaved rounds pair them in time."""
    ratios = [x / y for x, y in zip(a["samples_ms"], b["samples_ms"])]
    return statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else ratios * 3


METHODS = ("dora", "vera", "adalora")
SCENARIOS: dict[str, Callable[[argparse.Namespace], dict]] = {
    **{f"train-{m}": (lambda args, m=m: bench_train(m, args)) for m in METHODS},
    **{f"infer-{m}": (lambda args, m=m: bench_infer(m, args)) for m in METHODS},
    "memory-lorafa": bench_memory,
}
BASE_TARGETS = {"infer-dora": 1.30}  # peftkit / base; every timed scenario also targets peftkit ≤ peft


# ----------------------------------------------------------------------------- report


def _verdict(ratio: float, goal: float, paired: list[float] | None = None) -> str:
    """met; within noise when the lower quartile of the per-round ratios still meets the goal; else missed."""
    if ratio <= goal:
        return "met"
    return "within noise" if paired is not None and paired[0] <= goal else "**missed**"


def table(results: list[dict]) -> str:
    lines = ["| # | scenario | contender | median ms | min ms | IQR ms | n | ratio | target |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    timed = [r for r in results if "timings" in r]
    for i, r in enumerate(timed, 1):
        t, ref = r["timings"], r["ref"]
        for who, v in t.items():
            ratios = [f"{v['median_ms'] / t[ref]['median_ms']:.3f}× {ref}"] if who != ref else ["1.00 (ref)"]
            targets = []
            if who == "peftkit":
                if ref != "peft":
                    ratios.append(f"{r['ratio_peftkit_over_peft']:.3f}× peft")
                targets.append(f"≤ 1.00× peft {_verdict(r['ratio_peftkit_over_peft'], 1.0, r['paired_ratio_quartiles'])}")
                if r["scenario"] in BASE_TARGETS:
                    goal = BASE_TARGETS[r["scenario"]]
                    targets.append(f"≤ {goal:.2f}× base {_verdict(r['ratio_peftkit_over_base'], goal)}")
            lines.append(f"| {i} | {r['desc'] if who == next(iter(t)) else ''} | {who} | {v['median_ms']:.1f} | "
                         f"{v['min_ms']:.1f} | {v['iqr_ms']:.1f} | {v['n']} | {'; '.join(ratios)} | {'; '.join(targets)} |")
    for r in results:
        if "rows" not in r:
            continue
        lines += ["", f"{r['desc']}:", "",
                  "| contender | trainable | saved for backward MiB | ratio FA / LoRA | step peak MiB | ratio FA / LoRA |",
                  "|---|---:|---:|---:|---:|---:|"]
        for who, v in r["rows"].items():
            mib = {k: "n/a" if v[k] is None else f"{v[k] / 2**20:.1f}" for k in ("saved_for_backward_bytes", "step_peak_bytes")}
            ratio = {k: "" if v.get(k) is None else f"{v[k]:.3f}" for k in ("saved_for_backward_ratio", "step_peak_ratio")}
            lines.append(f"| {who} | {v['trainable_params']:,} | {mib['saved_for_backward_bytes']} | "
                         f"{ratio['saved_for_backward_ratio']} | {mib['step_peak_bytes']} | {ratio['step_peak_ratio']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__, SCENARIOS)
    args = parse_rounds(p, argv)
    if args.warmup + 3 * args.repeats + 2 >= ADALORA_TOTAL_STEP:  # + the profiled calls
        p.error(f"AdaLoRA's schedule spans {ADALORA_TOTAL_STEP} steps: ask for fewer warm-ups and repeats")
    return run_scenarios(args, SCENARIOS, table, _summary)


def _summary(r: dict) -> str | None:
    if "rounds" not in r:
        return None
    quartiles = [round(q, 3) for q in r["paired_ratio_quartiles"]]
    return (f"{r['scenario']}: check {r['check']}; rounds run {r['rounds']['rounds']}, kept {r['rounds']['kept']}; "
            f"per-round peftkit/peft ratio quartiles {quartiles}")


if __name__ == "__main__":
    sys.exit(main())
