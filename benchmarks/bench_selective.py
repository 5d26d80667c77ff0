"""Selective PEFT methods on MiniLM-L6 (CPU): trainable share, adapter size on disk, training memory and
step time, against full fine-tuning and LoRA.

Every selective method in peftkit's registry is a scenario (a method added later appears by itself),
plus `full` (every parameter trains, no adapter), `lora` (LoRA r=8, alpha=16 on query, value),
`ltsft-phase1` (LT-SFT's dense first phase), `child_tuning_d-5%` (at the learning test's fraction),
`child_tuning_d-100%` (every targeted entry: the dense weight gradient any exact method pays once a mask covers
most of a layer's entries) and
`diff_pruning-projected` (after the projection, the fixed-mask phase; `diff_pruning` itself is the gated
phase, its L0 penalty in the loss). Each trains
with a copy of the classifier head (`modules_to_save`), 5 labels, batch 16 x seq 128, train mode.
Methods without their own default targets go on every encoder Linear (the head excluded), at their
default fraction; data-driven masks are chosen on 8 random examples (Fisher) or after one step of the
dense phase (LT-SFT, diff pruning), which is all the layout of the mask depends on here.

Per scenario:
  trainable      trainable parameters, the head copy excluded (diff pruning's gate logits included), and their
                 share of the base's parameter count
  saved          bytes on disk of `peftkit.save` (full: the whole model's state dict as safetensors)
  state          bytes held between steps for training: trainable tensors + AdamW's moments
  step peak      peak of the CPU allocator's live bytes during one steady-state step, above its start
                 (bench_reparam's profiler measure: activations, gradients, optimizer temporaries)
  step ms        one step (zero_grad, forward with labels, backward, AdamW), timed in interleaved rounds
                 against LoRA (bench_lora's protocol and foreign-load filter); ratio to LoRA. Target for
                 methods whose masks are scattered elements (unstructured): <= 1.2x LoRA.

    python benchmarks/bench_selective.py                # full run
    python benchmarks/bench_selective.py --quick        # 1 warm-up, 3 rounds
    python benchmarks/bench_selective.py --only lora --only pafi --json out.json --profile
"""
from __future__ import annotations

import copy
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import peftkit
from peftkit.core.registry import adapter_deltas
from peftkit.core.config import METHODS
from peftkit.methods.selective.selection import FisherSelected
from peftkit.methods.selective.sparse import SelectiveConfig, SparseDelta
from bench_lora import (SEED, common_parser, interleaved, load_minilm, make_inputs, parse_rounds, profile,
                        run_scenarios)
from bench_reparam import _allocation_peak

LABELS, BATCH, SEQ = 5, 16, 128
NAME = "a"
HEAD = ["classifier"]
ENCODER_LINEAR = {"targets": ["type:Linear"], "exclude": HEAD}
UNSTRUCTURED_TARGET = 1.2  # step time of element-mask methods vs LoRA's


@lru_cache(maxsize=1)
def _base() -> nn.Module:
    torch.manual_seed(SEED)
    return load_minilm(num_labels=LABELS)


@lru_cache(maxsize=1)
def _batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    labels = torch.randint(0, LABELS, (BATCH,), generator=torch.Generator().manual_seed(1))
    return make_inputs(BATCH, SEQ, _base().config.vocab_size), labels


def _fisher_batches() -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    inputs, labels = make_inputs(8, SEQ, _base().config.vocab_size, seed=SEED + 3), torch.arange(8) % LABELS
    return [({k: v[i:i + 4] for k, v in inputs.items()}, labels[i:i + 4]) for i in (0, 4)]


@dataclass
class Contender:
    """One trainable model, its optimizer and what its loss adds; `step()` is one training step."""

    model: nn.Module
    regularizer: Callable[[], torch.Tensor] | None = None
    adapter: bool = True  # False: full fine-tuning, no adapter
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5,
                                           weight_decay=0.01)

    def step(self) -> None:
        inputs, labels = _batch()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(**inputs, labels=labels).loss
        (loss + self.regularizer() if self.regularizer is not None else loss).backward()
        self.optimizer.step()


def _one_step(model: nn.Module, regularizer: Callable[[], torch.Tensor] | None = None) -> None:
    """A dense phase's first step, so the changes it ranks are real."""
    Contender(model, regularizer).step()


# --------------------------------------------------------------------------- how each scenario is built


def _full() -> Contender:
    model = copy.deepcopy(_base())
    model.requires_grad_(True)
    return Contender(model, adapter=False)


def _attach(config: peftkit.AdapterConfig) -> nn.Module:
    return peftkit.attach(copy.deepcopy(_base()), config, name=NAME)


def _lora() -> Contender:
    return Contender(_attach(peftkit.LoRA(r=8, alpha=16, targets=["query", "value"], modules_to_save=HEAD)))


def _default_config(method: str, **fields) -> SelectiveConfig:
    cls = METHODS[method]
    targets = ENCODER_LINEAR if cls.model_fields["targets"].is_required() else {}
    return cls(**{**targets, **FIELDS.get(method, {}), **fields, "modules_to_save": HEAD})


def _selective(method: str, **fields) -> Contender:
    """Attach `method` at its defaults (or `fields`) and choose its mask the way its config asks."""
    model = _attach(_default_config(method, **fields))
    prepare = PREPARE.get(method)
    if prepare is not None:
        return Contender(model, prepare(model))
    unselected = any(isinstance(d, SparseDelta) and not d.selected for _, _, d in adapter_deltas(model, NAME))
    if unselected:
        if not isinstance(peftkit.adapters(model)[NAME], FisherSelected):
            raise SystemExit(f"{method}: its mask is chosen after attach in a way this benchmark does not know; "
                             "add a preparation to PREPARE")
        peftkit.select(model, NAME, _fisher_batches())
    return Contender(model)


def _diff_pruning(model: nn.Module) -> Callable[[], torch.Tensor]:
    return peftkit.diff_pruning_penalty(model, NAME)


def _diff_pruning_projected() -> Contender:
    model = _attach(_default_config("diff_pruning"))
    _one_step(model, peftkit.diff_pruning_penalty(model, NAME))
    peftkit.diff_pruning_project(model, NAME)
    return Contender(model)


def _ltsft(model: nn.Module) -> None:
    _one_step(model)
    peftkit.ltsft_select(model, NAME)


def _structured(model: nn.Module) -> None:
    peftkit.select_units(model, NAME, _fisher_batches())


FIELDS: dict[str, dict] = {"lastk": {"k": 1}}  # required fields without a default
PREPARE: dict[str, Callable[[nn.Module], Callable[[], torch.Tensor] | None]] = {
    "ltsft": _ltsft, "structured": _structured, "diff_pruning": _diff_pruning}


def _builders() -> dict[str, Callable[[], Contender]]:
    selective = sorted(m for m, cls in METHODS.items() if issubclass(cls, SelectiveConfig))
    return {"full": _full, "lora": _lora, **{m: (lambda m=m: _selective(m)) for m in selective},
            "ltsft-phase1": lambda: Contender(_attach(_default_config("ltsft"))),
            "diff_pruning-projected": _diff_pruning_projected,
            "child_tuning_d-5%": lambda: _selective("child_tuning_d", fraction=0.05),  # the learning test's fraction
            "child_tuning_d-100%": lambda: _selective("child_tuning_d", fraction=1.0)}  # every entry: the dense floor


# --------------------------------------------------------------------------- measuring


def _base_params() -> int:
    return sum(p.numel() for p in _base().parameters())


def _trained_entries(c: Contender) -> int:
    if not c.adapter:
        return _base_params()
    return sum(p.numel() for n, p in c.model.named_parameters() if p.requires_grad and not n.startswith(f"{HEAD[0]}."))


def _saved_bytes(c: Contender) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if c.adapter:
            peftkit.save(c.model, Path(tmp) / "adapter", NAME)
            return sum(f.stat().st_size for f in (Path(tmp) / "adapter").iterdir())
        save_file({k: v.contiguous() for k, v in c.model.state_dict().items()}, str(Path(tmp) / "model.safetensors"))
        return (Path(tmp) / "model.safetensors").stat().st_size


def _state_bytes(c: Contender) -> int:
    tensors = [p for p in c.model.parameters() if p.requires_grad]
    tensors += [t for state in c.optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _is_unstructured(c: Contender) -> bool:
    """True when the adapter holds scattered element masks (the 1.2x-LoRA speed target applies)."""
    return c.adapter and any(isinstance(d, SparseDelta) and any(diff.is_elements and diff.size() for _, diff in d.diffs())
                             for _, _, d in adapter_deltas(c.model, NAME))  # empty masks count as nothing


@lru_cache(maxsize=1)
def _lora_reference() -> Contender:
    return _lora()


def bench(scenario: str, args) -> dict:
    contender = _builders()[scenario]()
    contender.step()  # steady state: AdamW's moments exist
    row = {"scenario": scenario, "trained": _trained_entries(contender), "saved_bytes": _saved_bytes(contender),
           "state_bytes": _state_bytes(contender), "step_peak_bytes": _allocation_peak(contender.step),
           "unstructured": _is_unstructured(contender)}
    row["share"] = row["trained"] / _base_params()
    print(f"[{scenario}] {row}", flush=True)
    contenders = {"lora": _lora_reference().step} if scenario == "lora" else {"lora": _lora_reference().step,
                                                                             scenario: contender.step}
    row["timings"], row["rounds"] = interleaved(contenders, args.warmup, args.repeats, args.max_foreign)
    row["ratio_to_lora"] = row["timings"][scenario]["median_ms"] / row["timings"]["lora"]["median_ms"]
    if args.profile:
        row["profile"] = profile(contender.step, scenario)
    return row


# --------------------------------------------------------------------------- report


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def table(results: list[dict]) -> str:
    reference = {r["scenario"]: r for r in results}
    lines = ["| method | trainable | share of base | saved | state MiB | step peak MiB | step ms | × LoRA | target |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ms = r["timings"][r["scenario"]]["median_ms"]
        target = ""
        if r["unstructured"]:
            target = f"≤ {UNSTRUCTURED_TARGET}× LoRA {'met' if r['ratio_to_lora'] <= UNSTRUCTURED_TARGET else '**missed**'}"
        peak = "n/a" if r["step_peak_bytes"] is None else f"{r['step_peak_bytes'] / 2**20:.0f}"
        lines.append(f"| {r['scenario']} | {r['trained']:,} | {100 * r['share']:.3f}% | {_size(r['saved_bytes'])} | "
                     f"{r['state_bytes'] / 2**20:.1f} | {peak} | {ms:.0f} | {r['ratio_to_lora']:.2f} | {target} |")
    if "full" in reference and "lora" in reference:
        lines.append(f"\nfull fine-tuning: state {reference['full']['state_bytes'] / 2**20:.0f} MiB; "
                     f"LoRA: {reference['lora']['state_bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    scenarios = {name: (lambda args, name=name: bench(name, args)) for name in _builders()}
    parser = common_parser(__doc__, scenarios)
    args = parse_rounds(parser, argv)
    if args.infer_batch != parser.get_default("infer_batch"):
        parser.error("--infer-batch has no meaning here: every scenario trains on batch 16 x seq 128")
    return run_scenarios(args, scenarios, table, lambda r: (
        f"{r['scenario']}: rounds run {r['rounds']['rounds']}, kept {r['rounds']['kept']}"))


if __name__ == "__main__":
    sys.exit(main())
