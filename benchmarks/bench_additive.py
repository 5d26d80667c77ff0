"""Additive methods: peftkit vs Hugging Face PEFT (CPU), and one routed batch mixing five methods.

Scenarios (see benchmarks/README.md), each on its own copies of the same weights and inputs:
  train-<method>  one training step (forward with labels + backward + AdamW step), model in train mode:
                  ia3, prompt, prefix, bottleneck on MiniLM-L6 + a trainable classifier copy, batch 16 x
                  seq 128; llama-adapter on SmolLM2-135M (causal LM loss), batch 4 x seq 64. peft gets
                  peftkit's own adapter, saved in PEFT's format and loaded with `PeftModel.from_pretrained(
                  ..., is_trainable=True)`, so both start from the same tensors (random, so the adapter acts)
                  and train the same parameters; the start logits' max abs difference is printed. PEFT has
                  no bottleneck adapter: peftkit is reported alone.
  mixed           MiniLM-L6 BertModel, inference_mode, batch 48 x seq 128: every sixth row uses one of a
                  serial bottleneck adapter (Pfeiffer, 64), prefix tuning (10 tokens), (IA)³, prompt tuning
                  (10 tokens), LoRA (q,v r=8), or the bare base, all in one `peftkit.routed` forward pass,
                  vs the base model alone (target ≤ 1.15×); `peftkit-sorted` is the same batch with its rows
                  grouped by adapter, as a server batching requests would send it (slices, no gathers). The
                  encoder runs one pass per prompt length (core/length_buckets.py), so only the prompt rows
                  carry its 10 virtual tokens. One row per group is checked against that row
                  run alone. PEFT cannot run this batch: one PeftModel holds one method, and the scenario
                  records what PEFT does with `adapter_names` for IA3, prompt and prefix tuning (two adapters
                  of one method, rows alternating): 0.21.2 accepts the argument and ignores it, running every
                  row with the active adapter (LoRA honours it).

Timing, model loading and the /proc/stat filter of rounds with foreign CPU load are bench_lora.py's.
Prompt and prefix tuning are skipped (and said so) when this peftkit has no `PromptTuning` / `PrefixTuning`.

    python benchmarks/bench_additive.py                # full run
    python benchmarks/bench_additive.py --quick        # fewer repeats
    python benchmarks/bench_additive.py --only mixed --json out.json --profile
"""
from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import peftkit
from bench_lora import (SEED, common_parser, hidden_state_runner, interleaved, load_minilm, make_inputs, parse_rounds,
                        profile, run_scenarios, trainable)

LABELS = 5
MIXED_TARGET = 1.15  # peftkit routed / base
VIRTUAL_TOKENS = 10


def _methods() -> dict[str, Callable[[], peftkit.AdapterConfig] | None]:
    """The additive methods on MiniLM (None: not in this peftkit yet)."""
    prompt, prefix = getattr(peftkit, "PromptTuning", None), getattr(peftkit, "PrefixTuning", None)
    return {
        "bottleneck": lambda: peftkit.Bottleneck.preset("pfeiffer", bottleneck=64),
        "prefix": prefix and (lambda: prefix(num_virtual_tokens=VIRTUAL_TOKENS)),
        "ia3": lambda: peftkit.IA3(targets=["key", "value", "output.dense"], feedforward=["output.dense"]),
        "prompt": prompt and (lambda: prompt(num_virtual_tokens=VIRTUAL_TOKENS)),
        "lora": lambda: peftkit.LoRA(r=8, alpha=16, targets=["query", "value"]),
    }


@torch.no_grad()
def _perturb(model: nn.Module, name: str, gen: torch.Generator, std: float = 0.1) -> None:
    """Move every adapter tensor off its init (zero gates, unit scales, zero B) so the adapter acts."""
    for pname, p in model.named_parameters():
        if f".peftkit.{name}." in f".{pname}" and ".module." not in pname:  # not the task-head copy
            p.add_(torch.randn(p.shape, generator=gen) * std)


def _with_peft(ours: nn.Module, base: nn.Module, name: str) -> nn.Module:
    """PEFT's model for peftkit's adapter `name`, saved in PEFT's format and loaded trainable on a copy of `base`
    (with get_peft_model: `PeftModel.from_pretrained(is_trainable=True)` refuses prompt-learning adapters)."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as folder:
        saved = peftkit.save(ours, Path(folder) / name, name=name, format="peft")
        config = PeftConfig.from_pretrained(saved)
        config.inference_mode = False
        theirs = get_peft_model(copy.deepcopy(base), config)
        set_peft_model_state_dict(theirs, load_file(saved / "adapter_model.safetensors"))
    return theirs  # the start-logits check below shows the tensors arrived


def _logits_diff(ours: nn.Module, theirs: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    ours.eval(), theirs.eval()
    with torch.no_grad():
        return (ours(**inputs).logits - theirs(**inputs).logits).abs().max().item()


def _train_setup(method: str, args) -> tuple[nn.Module, nn.Module | None, dict, torch.Tensor]:
    """(peftkit model, peft model or None, inputs, labels) with the same adapter tensors in both."""
    torch.manual_seed(SEED)
    if method == "llama-adapter":
        from peftkit.models import load_smollm2

        base, _ = load_smollm2()
        config = peftkit.LlamaAdapter(adapter_len=10, adapter_layers=8)
        inputs = {"input_ids": torch.randint(100, base.config.vocab_size, (args.llama_batch, 64),
                                             generator=torch.Generator().manual_seed(SEED))}
        labels = inputs["input_ids"]
    else:
        base = load_minilm(num_labels=LABELS)
        config = _methods()[method]().model_copy(update={"modules_to_save": ["classifier"]})
        inputs = make_inputs(16, 128, base.config.vocab_size)
        labels = torch.randint(0, LABELS, (16,), generator=torch.Generator().manual_seed(1))
    ours = copy.deepcopy(base)
    peftkit.attach(ours, config, name="a")
    _perturb(ours, "a", torch.Generator().manual_seed(2))
    theirs = None if method == "bottleneck" else _with_peft(ours, base, "a")
    return ours, theirs, inputs, labels


def bench_train(method: str, args) -> dict:
    ours, theirs, inputs, labels = _train_setup(method, args)
    check = {"trainable_params": trainable(ours)}
    if theirs is not None:
        check |= {"trainable_params_peft": trainable(theirs), "max_abs_diff_logits_at_start": _logits_diff(ours, theirs, inputs)}
    print(f"[train-{method}] check: {check}", flush=True)

    def step(model: nn.Module) -> Callable[[], None]:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(**inputs, labels=labels).loss.backward()
            optimizer.step()
        return run

    contenders = {"peftkit": step(ours)} | ({} if theirs is None else {"peft": step(theirs)})
    t, rounds = interleaved(contenders, args.warmup, args.repeats, args.max_foreign)
    shape = "x".join(map(str, inputs["input_ids"].shape))
    res = {"scenario": f"train-{method}", "check": check, "timings": t, "rounds": rounds, "ref": "peft",
           "desc": f"train {method}; fwd+bwd+AdamW; batch x seq {shape}"}
    if theirs is not None:
        res["ratio_peftkit_over_peft"] = t["peftkit"]["median_ms"] / t["peft"]["median_ms"]
    if args.profile:
        res["profile"] = {k: profile(f, f"train-{method}/{k}") for k, f in contenders.items()}
    return res


def _row_alone(model: nn.Module, inputs: dict[str, torch.Tensor], row: int, name: str | None) -> torch.Tensor:
    one = {k: v[row:row + 1] for k, v in inputs.items()}
    with torch.inference_mode():
        if name is None:
            with peftkit.disabled(model):
                return model(**one).last_hidden_state[0]
        peftkit.activate(model, name)
        return model(**one).last_hidden_state[0]


def _peft_adapter_names(kind: str, peft_config) -> str:
    """What PEFT does with `adapter_names` for two adapters of one method, rows alternating a, b, a, b."""
    from peft import get_peft_model

    model = get_peft_model(load_minilm(num_labels=LABELS).eval(), peft_config(), adapter_name="a")
    model.add_adapter("b", peft_config())
    _perturb_peft(model, torch.Generator().manual_seed(4))
    inputs = make_inputs(4, 32, model.config.vocab_size)
    model.eval()
    with torch.inference_mode():
        per_adapter = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            per_adapter[name] = model(**inputs).logits
        model.set_adapter("a")
        try:
            mixed = model(**inputs, adapter_names=["a", "b", "a", "b"]).logits
        except Exception as err:  # noqa: BLE001 - the outcome is what we report
            return f"{kind}: refused ({type(err).__name__}: {err})"
    used = ["a" if torch.allclose(mixed[i], per_adapter["a"][i], atol=1e-6) else
            "b" if torch.allclose(mixed[i], per_adapter["b"][i], atol=1e-6) else "?" for i in range(4)]
    verdict = "honoured" if used == ["a", "b", "a", "b"] else "ignored: every row ran the active adapter" \
        if used == ["a"] * 4 else "wrong rows"
    return f"{kind}: adapter_names=[a, b, a, b] accepted, rows used {used} ({verdict})"


@torch.no_grad()
def _perturb_peft(model: nn.Module, gen: torch.Generator) -> None:
    for name, p in model.named_parameters():
        if any(k in name for k in ("ia3_l", "prompt_encoder", "lora_")):
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def _peft_routing_report() -> list[str]:
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    configs = {
        "IA3": lambda: IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                                 feedforward_modules=["output.dense"]),
        "prompt tuning": lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=VIRTUAL_TOKENS),
        "prefix tuning": lambda: PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=VIRTUAL_TOKENS),
        "LoRA": lambda: LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]),
    }
    return [_peft_adapter_names(kind, config) for kind, config in configs.items()]


def bench_mixed(args) -> dict:
    torch.manual_seed(SEED)
    base = load_minilm().eval()
    ours = copy.deepcopy(base)
    available = {name: make for name, make in _methods().items() if make is not None}
    skipped = sorted(set(_methods()) - set(available))
    gen = torch.Generator().manual_seed(3)
    for name, make in available.items():
        peftkit.attach(ours, make(), name=name)
        _perturb(ours, name, gen)
    ours.eval()
    groups = [*available, None]
    rows = [groups[i % len(groups)] for i in range(args.mixed_batch)]
    inputs = make_inputs(args.mixed_batch, 128, base.config.vocab_size)

    def routed_run(row_names: list[str | None], batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode(), peftkit.routed(ours, row_names):
                return ours(**batch).last_hidden_state
        return run

    run_ours = routed_run(rows, inputs)
    order = sorted(range(len(rows)), key=lambda i: groups.index(rows[i]))  # as a server grouping requests sends them
    contenders = {"base": hidden_state_runner(base, inputs), "peftkit": run_ours,
                  "peftkit-sorted": routed_run([rows[i] for i in order], {k: v[order] for k, v in inputs.items()})}
    mixed = run_ours()
    check = {}
    for row, name in enumerate(groups):  # row i < len(groups) uses groups[i]; its alone run sets the length
        alone, bare = _row_alone(ours, inputs, row, name), _row_alone(ours, inputs, row, None)
        check[f"max_abs_diff_routed_vs_alone[{name or 'base'}]"] = (mixed[row, :len(alone)] - alone).abs().max().item()
        if name is not None:  # the adapter really acts (prompt rows: its virtual tokens come first)
            check[f"max_abs_diff_vs_base[{name}]"] = (alone[-len(bare):] - bare).abs().max().item()
    peft_report = _peft_routing_report()
    print(f"[mixed] rows per method {args.mixed_batch // len(groups)}; skipped {skipped or 'none'}; check: {check}",
          flush=True)
    print("\n".join(f"[mixed] peft {line}" for line in peft_report), flush=True)
    t, rounds = interleaved(contenders, args.warmup, args.repeats, args.max_foreign)
    res = {"scenario": "mixed", "check": check, "peft_adapter_names": peft_report, "skipped": skipped,
           "timings": t, "rounds": rounds, "ref": "base",
           "ratio_peftkit_over_base": t["peftkit"]["median_ms"] / t["base"]["median_ms"],
           "ratio_peftkit-sorted_over_base": t["peftkit-sorted"]["median_ms"] / t["base"]["median_ms"],
           "desc": f"routed: {' / '.join(available)} / base rows, inference_mode; batch {args.mixed_batch} x seq 128"}
    if args.profile:
        res["profile"] = {k: profile(f, f"mixed/{k}") for k, f in contenders.items()}
    return res


METHODS = ("ia3", "prompt", "prefix", "bottleneck", "llama-adapter")
SCENARIOS: dict[str, Callable] = {**{f"train-{m}": (lambda args, m=m: bench_train(m, args)) for m in METHODS},
                                  "mixed": bench_mixed}


def table(results: list[dict]) -> str:
    lines = ["| # | scenario | contender | median ms | min ms | IQR ms | n | ratio | target |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(results, 1):
        t, ref = r["timings"], r["ref"]
        for who, v in t.items():
            ratio, target = "1.00 (ref)" if who == ref else "", ""
            if who == "peftkit" and "ratio_peftkit_over_peft" in r:
                ratio = f"{r['ratio_peftkit_over_peft']:.3f}× peft"
            elif who.startswith("peftkit") and ref == "base":
                value = r[f"ratio_{who}_over_base"]
                ratio, target = f"{value:.3f}× base", f"≤ {MIXED_TARGET:.2f}× {'met' if value <= MIXED_TARGET else '**missed**'}"
            elif who == "peftkit":
                ratio = "no PEFT equivalent"
            lines.append(f"| {i} | {r['desc'] if who == next(iter(t)) else ''} | {who} | {v['median_ms']:.1f} | "
                         f"{v['min_ms']:.1f} | {v['iqr_ms']:.1f} | {v['n']} | {ratio} | {target} |")
    return "\n".join(lines)


def _summary(r: dict) -> str:
    peft = "".join(f"\n  peft {line}" for line in r.get("peft_adapter_names", []))
    return (f"{r['scenario']}: check {r['check']}; rounds run {r['rounds']['rounds']}, kept {r['rounds']['kept']}"
            f"{'; skipped ' + ', '.join(r['skipped']) if r.get('skipped') else ''}{peft}")


def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__, SCENARIOS)
    p.add_argument("--mixed-batch", type=int, default=48, help="rows of the routed batch (a multiple of 6)")
    p.add_argument("--llama-batch", type=int, default=4, help="rows of the LLaMA-Adapter training batch (seq 64)")
    args = parse_rounds(p, argv)
    skipped = [f"train-{m}" for m in ("prompt", "prefix") if _methods()[m] is None]
    if skipped:
        print(f"this peftkit lacks {', '.join(skipped)}'s method: skipping it", flush=True)
        args.only = [s for s in (args.only or list(SCENARIOS)) if s not in skipped]
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    return run_scenarios(args, SCENARIOS, table, _summary)


if __name__ == "__main__":
    sys.exit(main())
