"""Fine-tune a sequence classifier with any peftkit adapter, and measure accuracy.

A deliberately small in-memory loop (AdamW, linear decay, tqdm progress) for the methods'
learning tests. Training from a config, with checkpoints, resume, evaluation each epoch and
the other tasks, is `peftkit.train.run_training` (behind `peftkit train`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class ClassifyConfig:
    epochs: int = 2
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_length: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class ClassifyResult:
    accuracy_before: float
    accuracy_after: float
    train_seconds: float
    steps: int
    losses: list[float]


def encode(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise once up front: every epoch then reuses the same tensors."""
    return dict(tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"))


def _batches(inputs: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int,
             generator: torch.Generator | None) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    n = labels.shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield {k: v[idx] for k, v in inputs.items()}, labels[idx]


@torch.inference_mode()
def accuracy(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int = 64) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for batch, y in _batches(inputs, labels, batch_size, None):
        correct += (model(**batch).logits.argmax(-1) == y).sum().item()
    model.train(was_training)
    return correct / max(labels.shape[0], 1)


def train_classifier(
    model: nn.Module,
    tokenizer,
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    test_texts: Sequence[str],
    test_labels: Sequence[int],
    config: ClassifyConfig = ClassifyConfig(),
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    regularizer: Callable[[], torch.Tensor] | None = None,
    param_groups: list[dict] | None = None,
    on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
) -> ClassifyResult:
    """Train the model's trainable parameters (the attached adapters) and report test accuracy.

    `on_step(step)` runs after each optimizer step, while the gradients are still there (AdaLoRA's
    rank allocation); `regularizer()` is added to the loss (AdaLoRA's orthogonality penalty);
    `param_groups` replaces the single AdamW group (LoRA+'s faster B; groups keep their own lr).
    `on_optimizer(optimizer)` runs once before training, for callbacks that move optimizer state (Fish-Dip).
    """
    if not train_texts or not test_texts:
        raise ValueError("train and test sets must not be empty")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: attach an adapter first")
    torch.manual_seed(config.seed)
    x_train, y_train = encode(tokenizer, train_texts, config.max_length), torch.tensor(list(train_labels))
    x_test, y_test = encode(tokenizer, test_texts, config.max_length), torch.tensor(list(test_labels))
    before = accuracy(model, x_test, y_test)
    optimizer = torch.optim.AdamW(param_groups or params, lr=config.lr, weight_decay=config.weight_decay)
    if on_optimizer is not None:
        on_optimizer(optimizer)
    steps = config.epochs * math.ceil(len(train_texts) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    with tqdm(total=steps, desc="train", unit="step", disable=not progress) as bar:
        for _ in range(config.epochs):
            for batch, y in _batches(x_train, y_train, config.batch_size, generator):
                loss = nn.functional.cross_entropy(model(**batch).logits, y)
                (loss + regularizer() if regularizer is not None else loss).backward()
                optimizer.step()
                if on_step is not None:
                    on_step(len(losses))  # the 0-based index of this step
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    seconds = time.perf_counter() - start
    return ClassifyResult(before, accuracy(model, x_test, y_test), seconds, steps, losses)
