"""`peftkit` command line. `peftkit train` fine-tunes a bundled model on a bundled dataset."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _train(args: argparse.Namespace) -> int:
    import peftkit
    from peftkit.data import load_bbc_news
    from peftkit.models import load_minilm
    from peftkit.train.classify import ClassifyConfig, train_classifier

    torch.manual_seed(args.seed)
    data = load_bbc_news(seed=args.seed)
    train, test = data["train"], data["test"]
    if args.limit:
        train = train.shuffle(seed=args.seed).select(range(min(args.limit, len(train))))
    labels = train.features["label"].names
    model, tokenizer = load_minilm(num_labels=len(labels))
    lora = peftkit.LoRA(r=args.r, alpha=args.alpha, dropout=args.dropout, targets=args.targets.split(","),
                        modules_to_save=["classifier"])
    peftkit.attach(model, lora, name="bbc")
    stats = peftkit.summary(model)
    print(f"MiniLM-L6 + LoRA(r={args.r}, alpha={args.alpha}, targets={args.targets}) on BBC News "
          f"({len(train)} train / {len(test)} test articles, {len(labels)} topics: {', '.join(labels)})")
    print(f"trainable parameters: {stats.trainable:,} of {stats.total:,} ({100 * stats.trainable / stats.total:.2f}%)")
    config = ClassifyConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                            seed=args.seed)
    result = train_classifier(model, tokenizer, train["text"], train["label"], test["text"], test["label"], config)
    print(f"test accuracy before: {result.accuracy_before:.3f}  after: {result.accuracy_after:.3f}  "
          f"(chance {1 / len(labels):.3f})")
    print(f"training time: {result.train_seconds:.1f} s for {result.steps} steps "
          f"({result.steps * args.batch_size / result.train_seconds:.1f} samples/s, {torch.get_num_threads()} threads)")
    if args.output:
        path = peftkit.save(model, Path(args.output), name="bbc")
        print(f"adapter saved to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune MiniLM-L6 with LoRA on BBC News (bundled model and data)")
    train.add_argument("--r", type=int, default=8)
    train.add_argument("--alpha", type=float, default=16.0)
    train.add_argument("--dropout", type=float, default=0.0)
    train.add_argument("--targets", default="query,value", help="comma-separated module names or suffixes")
    train.add_argument("--epochs", type=int, default=2)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--max-length", type=int, default=128)
    train.add_argument("--limit", type=int, default=0, help="use only this many training articles (0: all)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--output", default="runs/bbc-lora", help="where to save the adapter ('' to skip)")
    args = parser.parse_args(argv)
    try:
        return _train(args)
    except (ValueError, ImportError) as err:
        print(f"peftkit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
