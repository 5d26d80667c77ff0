"""Concurrent multi-adapter training: each job's result equals training it alone (same seed, same order)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.train.concurrent import Job, JobError, MultiJobTrainer, RowCouplingError
from peftkit.train.engine import TrainingError

from .conftest import TinyNet


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread beats two that contend for a busy machine's cores (10x here under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _labels(ids: torch.Tensor, task: int) -> torch.Tensor:
    """Three different tasks on the same kind of input."""
    return [ids[:, 0] % 3, ids.sum(1) % 3, (ids[:, -1] > 25).long() + (ids[:, 1] > 40).long()][task]


def _dataset(n: int, task: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 50, (n, 5), generator=torch.Generator().manual_seed(seed))
    return {"ids": ids, "labels": _labels(ids, task)}


def _collate(data, idx):
    return data["ids"][idx], data["labels"][idx]


def _row_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _weighted_ce(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A units-weighted loss (like tokens of a language-model loss): rows with label 0 count 3 times."""
    weight = 1.0 + 2.0 * (y == 0).float()
    return F.cross_entropy(out, y, reduction="none") * weight, weight


def _model_with_four_adapters() -> nn.Module:
    """Four method families on one backbone, each with its own copy of the head."""
    model = TinyNet()
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, targets=["q", "v"], init="gaussian", modules_to_save=["head"]), "lora")
    peftkit.attach(model, peftkit.Bottleneck(bottleneck=8, targets=["ffn.2"], modules_to_save=["head"]), "adapter")
    peftkit.attach(model, peftkit.BitFit(targets=["ffn.0", "ffn.2"], modules_to_save=["head"]), "bitfit")
    peftkit.attach(model, peftkit.IA3(targets=["k", "v", "ffn.2"], feedforward=["ffn.2"], modules_to_save=["head"]), "ia3")
    return model


def _jobs() -> list[Job]:
    """Different data sizes, batch sizes, epochs, optimizers, schedules, seeds and losses."""
    return [
        Job("lora", _dataset(40, 0, seed=1), _row_ce, _collate, batch_size=8, epochs=2, lr=1e-2, seed=3,
            schedule=lambda opt, total: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)),
        Job("adapter", _dataset(30, 1, seed=2), _row_ce, _collate, batch_size=7, epochs=1, seed=4,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)),
        Job("bitfit", _dataset(24, 2, seed=5), _weighted_ce, _collate, batch_size=5, epochs=3, lr=2e-2, seed=6),
        Job("ia3", _dataset(20, 0, seed=7), _row_ce, _collate, batch_size=6, epochs=1, lr=2e-2, seed=8),
    ]


def _train_alone(model: nn.Module, job: Job) -> list[float]:
    """The reference: a plain loop with only this adapter active and the model in eval mode (no dropout)."""
    peftkit.activate(model, job.adapter)
    model.eval()
    params = [p for p in peftkit.adapter_parameters(model, job.adapter) if p.requires_grad]
    opt = job.optimizer(params) if job.optimizer else torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0)
    schedule = job.schedule(opt, job.total_steps) if job.schedule else None
    losses = []
    generator = torch.Generator().manual_seed(job.seed)
    for _ in range(job.epochs):
        for idx in torch.randperm(len(job.data["ids"]), generator=generator).split(job.batch_size):
            x, y = _collate(job.data, idx)
            loss = job.loss(model(x), y)
            loss = loss[0].sum() / loss[1].sum() if isinstance(loss, tuple) else loss.mean()
            loss.backward()
            opt.step()
            if schedule is not None:
                schedule.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return losses


def _adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".peftkit.{name}." in n}


@pytest.mark.parametrize("max_rows", [None, 8])
def test_concurrent_jobs_equal_separate_runs(max_rows) -> None:
    """LoRA, a bottleneck adapter, BitFit and (IA)³ on different tasks: each equals its own run alone."""
    model = _model_with_four_adapters()
    initial = copy.deepcopy(model)
    jobs = _jobs()
    passes = []
    model.register_forward_hook(lambda m, args, out: passes.append(args[0].shape[0]))
    trainer = MultiJobTrainer(model, max_rows=max_rows)
    for job in jobs[:2] + jobs[3:]:
        trainer.add(job)
    trainer.step()
    trainer.step()
    trainer.add(jobs[2])  # joins while the others continue
    states = trainer.run()
    # "adapter" (5 steps) finishes long before "bitfit" (15 steps, started at step 3)
    assert [states[j.adapter].step for j in jobs] == [10, 5, 15, 4] and not trainer.active
    assert max(passes) == (26 if max_rows is None else 8)  # all four batches in one pass, or one job per pass
    for job in jobs:
        alone = copy.deepcopy(initial)
        losses = _train_alone(alone, job)
        torch.testing.assert_close(states[job.adapter].losses, losses, rtol=1e-5, atol=1e-6)
        trained, reference, start = (_adapter_state(m, job.adapter) for m in (model, alone, initial))
        assert trained.keys() == reference.keys() and trained
        for key in trained:
            torch.testing.assert_close(trained[key], reference[key], rtol=1e-4, atol=1e-6, msg=key)
        assert any(not torch.allclose(trained[k], start[k]) for k in trained), f"{job.adapter} did not train"
    assert states["lora"].losses[-1] < states["lora"].losses[0]


def test_finish_stops_one_job_and_others_continue() -> None:
    model = _model_with_four_adapters()
    trainer = MultiJobTrainer(model)
    finished = []
    trainer.on_finish = lambda state: finished.append(state.job.adapter)
    jobs = _jobs()
    for job in jobs:
        trainer.add(job)
    trainer.step()
    frozen = _adapter_state(model, "lora")
    trainer.finish("lora")
    trainer.step()
    assert finished == ["lora"] and [s.job.adapter for s in trainer.active] == ["adapter", "bitfit", "ia3"]
    assert all(torch.equal(v, _adapter_state(model, "lora")[k]) for k, v in frozen.items())  # no longer updated
    trainer.run()
    assert finished == ["lora", "ia3", "adapter", "bitfit"]
    with pytest.raises(JobError, match="no running job for adapter 'lora'"):
        trainer.finish("lora")
    trainer.add(jobs[0])  # a finished adapter can start a new job
    assert trainer.step().keys() == {"lora"}


def test_jobs_that_would_couple_rows_are_refused() -> None:
    model = TinyNet()
    peftkit.attach(model, peftkit.LoRA(r=2, targets=["q"], dropout=0.1), "drop")
    trainer = MultiJobTrainer(model)
    trainer.add(Job("drop", _dataset(8, 0, 0), _row_ce, _collate))
    with pytest.raises(RowCouplingError, match=r"attn\.q\.peftkit\.drop\.dropout.*Dropout.*dropout=0"):
        trainer.step()

    class NormHead(TinyNet):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 3))

    model = NormHead()
    peftkit.attach(model, peftkit.LoRA(r=2, targets=["q"], modules_to_save=["head"]), "bn")
    trainer = MultiJobTrainer(model)
    trainer.add(Job("bn", _dataset(8, 0, 0), _row_ce, _collate))
    with pytest.raises(RowCouplingError, match="BatchNorm1d"):
        trainer.step()


def test_backbone_batchnorm_runs_in_eval_mode() -> None:
    """A BatchNorm in the frozen backbone uses its running statistics, so rows stay independent."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    peftkit.attach(model, peftkit.LoRA(r=2, targets=["0"]), "a")
    peftkit.attach(model, peftkit.LoRA(r=2, targets=["2"], init="gaussian"), "b")
    data = {"x": torch.randn(12, 4), "labels": torch.randint(0, 2, (12,))}
    collate = lambda d, idx: (d["x"][idx], d["labels"][idx])  # noqa: E731
    running_mean = model[1].running_mean.clone()
    trainer = MultiJobTrainer(model)
    trainer.add(Job("a", data, _row_ce, collate, batch_size=4, lr=0.1))
    trainer.add(Job("b", data, _row_ce, collate, batch_size=4, lr=0.1))
    trainer.run()
    assert torch.equal(model[1].running_mean, running_mean) and not model[1].training


def test_bad_jobs_are_refused() -> None:
    model = TinyNet()
    peftkit.attach(model, peftkit.LoRA(r=2, targets=["q"]), "a")
    trainer = MultiJobTrainer(model)
    data = _dataset(8, 0, 0)
    with pytest.raises(JobError, match="'zzz' is not attached.*attached: a"):
        trainer.add(Job("zzz", data, _row_ce, _collate))
    trainer.add(Job("a", data, _row_ce, _collate))
    with pytest.raises(JobError, match="'a' already has a running job"):
        trainer.add(Job("a", data, _row_ce, _collate))
    with pytest.raises(JobError, match="batch_size must be >= 1"):
        Job("a", data, _row_ce, batch_size=0)
    with pytest.raises(JobError, match="no data rows"):
        Job("a", {"ids": torch.zeros(0, 5), "labels": torch.zeros(0)}, _row_ce)
    peftkit.attach(model, peftkit.LoRA(r=2, targets=["v"]), "frozen")
    peftkit.set_trainable(model, "frozen", False)
    with pytest.raises(JobError, match="'frozen' has no trainable parameters"):
        trainer.add(Job("frozen", data, _row_ce, _collate))
    model.head.weight.requires_grad_(True)
    with pytest.raises(JobError, match=r"outside any adapter.*head\.weight"):
        trainer.add(Job("frozen", data, _row_ce, _collate))
    model.head.weight.requires_grad_(False)
    masked = MultiJobTrainer(model)
    masked.add(Job("a", data, lambda out, y: (_row_ce(out, y), torch.zeros(len(y))), _collate))
    with pytest.raises(TrainingError, match="adapter 'a'.*no loss units"):
        masked.step()
    with pytest.raises(ValueError, match="needs a `sync`"):
        MultiJobTrainer(model, shard=(0, 2))


def test_default_collate_and_separate_passes_for_different_inputs() -> None:
    """Pairs are stacked, tensor dicts indexed; a tensor batch and a dict batch cannot share a pass."""
    model = TinyNet()
    peftkit.attach(model, peftkit.LoRA(r=2, targets=["q"], init="gaussian"), "a")
    peftkit.attach(model, peftkit.LoRA(r=2, targets=["q"], init="gaussian"), "b")
    data = _dataset(6, 0, 0)
    with pytest.raises(JobError, match="needs a 'labels' entry"):
        Job("a", {"ids": data["ids"]}, _row_ce).collate({"ids": data["ids"]}, torch.arange(2))
    passes = []
    model.register_forward_hook(lambda m, args, kwargs, out: passes.append(len(args)), with_kwargs=True)
    trainer = MultiJobTrainer(model)
    trainer.add(Job("a", [(data["ids"][i], data["labels"][i]) for i in range(6)], _row_ce, batch_size=3))
    trainer.add(Job("b", data, _row_ce, batch_size=3))  # {"ids": ...} is passed as model(ids=...)
    losses = trainer.step()
    assert passes == [1, 0] and losses.keys() == {"a", "b"}


def test_routed_training_through_output_scaling_with_presorted_rows(ids) -> None:
    """Regression: (IA)³'s l ⊙ out on presorted rows (the slice path) must not break backward."""
    from .checks import assert_routed_grads_match_rows
    from .conftest import randomize

    model = TinyNet()
    peftkit.attach(model, peftkit.IA3(targets=["k", "v"]), "a")
    peftkit.attach(model, peftkit.LoRA(r=2, targets=["q", "v"]), "b")
    randomize(model)
    grads = assert_routed_grads_match_rows(model, ids, ["a", "a", "a", "b", "b", "b"])
    assert any(".peftkit.a.ia3_l" in n and g.abs().sum() > 0 for n, g in grads.items())


def _tiny_hf(task: str) -> nn.Module:
    import transformers

    if task == "classify-text":
        return transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, num_labels=3))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16))


def _task_rows(task: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Rows as `peftkit.train.tasks` makes them: right-padded to 10, labels per row (or -100 outside answers)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 11, (n,), generator=g)
    mask = (torch.arange(10) < lengths[:, None]).long()
    ids = torch.randint(1, 50, (n, 10), generator=g) * mask
    if task == "classify-text":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids[:, 1] % 3}
    prompt = torch.randint(1, 4, (n, 1), generator=g)
    labels = torch.where((torch.arange(10) >= prompt) & (mask == 1), ids, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("task_name", ["classify-text", "causal-lm-chat"])
def test_task_jobs_equal_the_tasks_own_scoring(task_name) -> None:
    """Jobs built from the trainer's Task (loss sums and units per row: tokens for the LM) equal single runs
    scored by the Task itself, with its per-batch padding cut."""
    from peftkit.train.concurrent import task_job
    from peftkit.train.tasks import TASKS

    task = TASKS[task_name]()
    model = _tiny_hf(task_name)
    hosts = ["query", "value"] if task_name == "classify-text" else ["q_proj", "v_proj"]
    peftkit.attach(model, peftkit.LoRA(r=2, targets=hosts, init="gaussian"), "a")
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=2, targets=hosts[1:], init="gaussian"), "b")
    initial = copy.deepcopy(model)
    jobs = [task_job(task, _task_rows(task_name, 12, 1), "a", batch_size=4, lr=1e-2, seed=1),
            task_job(task, _task_rows(task_name, 10, 2), "b", batch_size=3, epochs=2, lr=1e-2, seed=2)]
    trainer = MultiJobTrainer(model)
    for job in jobs:
        trainer.add(job)
    states = trainer.run()
    for job in jobs:
        alone = copy.deepcopy(initial)
        peftkit.activate(alone, job.adapter)
        alone.eval()
        opt = torch.optim.AdamW([p for p in peftkit.adapter_parameters(alone, job.adapter)], lr=job.lr, weight_decay=0.0)
        losses = []
        for idx in job.batch_indices():
            stats = task.row_stats(alone, task.collate(job.data, idx))  # padding cut to the batch's longest row
            loss = stats.loss_sum.sum() / stats.units.sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        torch.testing.assert_close(states[job.adapter].losses, losses, rtol=1e-5, atol=1e-6)
        for key, value in _adapter_state(alone, job.adapter).items():
            torch.testing.assert_close(_adapter_state(model, job.adapter)[key], value, rtol=1e-4, atol=1e-6)
