"""Does a BitDelta keep the accuracy of the full fine-tune it compresses? MiniLM-L6 on BBC News topics (CPU, fp32).

1. Full fine-tune MiniLM (every parameter, a fresh 5-way head) through `run_training` on the first TRAIN_ROWS
   articles of the bundled train split (seed 0), 2 epochs, batch 16, `--tokens` tokens per article; cached under
   OUTPUT/finetune (a rerun reuses it; `--retrain` trains again).
2. `compress` it onto a fresh MiniLM: signs + α₀ = mean |ΔW| on every Linear of the encoder and the pooler, the
   classifier head copied, embedding rows and LayerNorms the fine-tune changed kept exactly.
3. `distill_scales`: only the α's, `--steps` Adam steps at `--lr` on the first `--batches` training batches, MSE to
   the fine-tune's logits.
4. Score on the first TEST_ROWS articles of the bundled test split: the fine-tune, the base with the fine-tune's
   head (the control), BitDelta at α₀, BitDelta distilled, and BitDelta with the signs switched off (α = 0: the
   exact parts and head alone); the logit MSE to the fine-tune on those rows; the file sizes.

    python benchmarks/bench_bitdelta.py                     # fine-tune ~2.5 min, distillation ~2-6 min on 2 shared CPU cores
    python benchmarks/bench_bitdelta.py --steps 40 --lr 1e-5      # the shorter distillation of docs/bitdelta.md

Writes OUTPUT/results.json and prints a Markdown table (docs/bitdelta.md holds a dated run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import peftkit
from peftkit.core.registry import adapter_deltas
from peftkit.methods.reparameterized.bitdelta import BitDeltaDelta, compress, distill_scales
from peftkit.models import load_minilm
from peftkit.train import TASKS, run_training
from peftkit.train.full import load_full, save_full
from peftkit.train.config import DataSection

TRAIN_ROWS, TEST_ROWS, LABELS = 320, 500, 5


def data_section(tokens: int) -> DataSection:
    return DataSection(name="bbc-news", max_length=tokens, train_limit=TRAIN_ROWS, eval_limit=TEST_ROWS)


def finetune(folder: Path, tokens: int, lr: float, retrain: bool) -> nn.Module:
    """The full fine-tune, trained once and cached as a saved full fine-tune."""
    model = load_minilm(num_labels=LABELS)[0]
    if (folder / "model.safetensors").is_file() and not retrain:
        load_full(model, folder)
        return model
    config = {"method": {"method": "full"}, "data": data_section(tokens).model_dump(), "optimizer": {"lr": lr},
              "schedule": {"epochs": 2, "batch_size": 16}, "eval": {"restore_best": False},
              "output": {"save": False, "plot": False, "dir": tempfile.mkdtemp(prefix="peftkit-bitdelta-")},
              "seed": 0, "device": "cpu", "precision": "fp32", "progress": False}
    trained = run_training(config).model
    save_full(trained, folder)
    return trained


@torch.inference_mode()
def logits(model: nn.Module, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**{k: v[i:i + 64] for k, v in rows.items() if k != "labels"}).logits
                      for i in range(0, len(rows["labels"]), 64)])


def set_scales(model: nn.Module, scales: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for delta, value in zip(bitdeltas(model), scales):
            delta.scale.copy_(value)


def bitdeltas(model: nn.Module) -> list[BitDeltaDelta]:
    return [d for _, _, d in adapter_deltas(model, "ft") if isinstance(d, BitDeltaDelta)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench-bitdelta"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--finetune-lr", type=float, default=5e-5)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    tuned = finetune(args.output / "finetune", args.tokens, args.finetune_lr, args.retrain)
    finetune_seconds = time.perf_counter() - start

    task, section = TASKS["classify-text"](), data_section(args.tokens)
    data = task.encode(task.read_data(section, seed=0), load_minilm()[1], section)
    labels = data.eval["labels"]
    teacher = logits(tuned, data.eval)

    control = load_minilm(num_labels=LABELS)[0]  # the base encoder under the fine-tune's head
    control.classifier.load_state_dict(tuned.classifier.state_dict())
    control_logits = logits(control, data.eval)
    base = load_minilm(num_labels=LABELS)[0]
    start = time.perf_counter()
    compress(base, tuned, name="ft", heads=["classifier"])
    compress_seconds = time.perf_counter() - start
    initial = [d.scale.detach().clone() for d in bitdeltas(base)]
    at_init = logits(base, data.eval)

    batches = [{k: v for k, v in task.collate(data.train, idx).items() if k != "labels"}
               for idx in torch.arange(args.batches * 16).split(16)]
    start = time.perf_counter()
    losses = distill_scales(base, "ft", tuned, batches, steps=args.steps, lr=args.lr)
    distill_seconds = time.perf_counter() - start
    distilled = logits(base, data.eval)
    tuned_scales = [d.scale.detach().clone() for d in bitdeltas(base)]
    set_scales(base, [torch.zeros(()) for _ in initial])
    signs_off = logits(base, data.eval)
    set_scales(base, tuned_scales)

    with tempfile.TemporaryDirectory() as folder:
        adapter = peftkit.save(base, Path(folder) / "adapter", name="ft")
        adapter_bytes = (adapter / "adapter.safetensors").stat().st_size
    finetune_bytes = (args.output / "finetune" / "model.safetensors").stat().st_size if \
        (args.output / "finetune" / "model.safetensors").is_file() else None

    def accuracy(out: torch.Tensor) -> float:
        return float((out.argmax(-1) == labels).float().mean())

    def mse(out: torch.Tensor) -> float:
        return float(((out - teacher) ** 2).mean())

    rows = {"full fine-tune": teacher, "base encoder + fine-tuned head (control)": control_logits,
            "BitDelta, α₀ = mean |ΔW|": at_init, "BitDelta, α distilled": distilled,
            "BitDelta, signs off (α = 0)": signs_off}
    results = {
        "date": datetime.date.today().isoformat(), "args": {k: str(v) for k, v in vars(args).items()},
        "test_rows": len(labels), "accuracy": {k: accuracy(v) for k, v in rows.items()},
        "logit_mse_to_finetune": {k: mse(v) for k, v in rows.items()},
        "distill_losses": [losses[0], losses[-1]], "scales_initial_mean": float(torch.stack(initial).mean()),
        "scales_distilled_mean": float(torch.stack(tuned_scales).mean()),
        "finetune_file_bytes": finetune_bytes, "adapter_file_bytes": adapter_bytes,
        "seconds": {"finetune (or load)": finetune_seconds, "compress": compress_seconds, "distill": distill_seconds},
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    print("| model | accuracy | logit MSE to the fine-tune |\n|---|---|---|")
    for key in rows:
        print(f"| {key} | {results['accuracy'][key]:.3f} | {results['logit_mse_to_finetune'][key]:.4f} |")
    print(json.dumps({k: v for k, v in results.items() if k not in ("accuracy", "logit_mse_to_finetune")}, indent=2))


if __name__ == "__main__":
    main()
