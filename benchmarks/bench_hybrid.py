"""Do hybrid designs learn? UniPELT, MAM and an S4-style spindle layer-group design on BBC News, beside their parts.

MiniLM-L6 on the tests' BBC subset (tests/bbc.py: the first 320 training and 200 test articles shuffled with seed 0,
32 tokens each, batches of 16, AdamW with linear decay, CPU, fp32, seed 0), each design training a copy of the
classifier head with it, through `run_training` (what `peftkit train` runs), at each learning rate of its grid.
Reported per run: the adapter's trainable parameters (its head copy included), test accuracy after training, the
accuracy with the adapter switched off after training (its trained head kept), and the head alone trained at the
same learning rate (the control of tests/bbc.py).

    PYTHONPATH=src python benchmarks/bench_hybrid.py                       # every design and reference
    PYTHONPATH=src python benchmarks/bench_hybrid.py --designs unipelt --lrs 1e-2
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/bbc.py: the tests' BBC subset and trainer

import peftkit  # noqa: E402
from peftkit.methods import MAM, Bottleneck, LoRA, PrefixTuning, UniPELT  # noqa: E402
from peftkit.methods.hybrid import s4_model  # noqa: E402
from tests.bbc import adapter_off_accuracy, fit_bbc, head_only  # noqa: E402

QV = ["query", "value"]


DESIGNS = {
    "unipelt": UniPELT(),
    "mam": MAM(),
    "s4-spindle": s4_model(),
    "lora": LoRA(r=8, alpha=16, targets=QV),
    "prefix": PrefixTuning(num_virtual_tokens=10),
    "bottleneck": Bottleneck.preset("pfeiffer", bottleneck=32),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--designs", nargs="+", choices=list(DESIGNS), default=list(DESIGNS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3, 1e-2])
    args = parser.parse_args()
    print(f"# bench_hybrid {datetime.date.today()}: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print("| design | lr | trainable | accuracy | adapter off | head alone | train s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.designs:
        for lr in args.lrs:
            result, model, _ = fit_bbc(DESIGNS[name], lr=lr, margin=None)
            params = peftkit.summary(model).per_adapter["default"]
            print(f"| {name} | {lr:g} | {params:,} | {result.accuracy_after:.3f} | {adapter_off_accuracy(model):.3f} "
                  f"| {head_only(lr).accuracy_after:.3f} | {result.train_seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
