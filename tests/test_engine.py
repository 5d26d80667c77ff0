"""One training engine (#16): every registered method trains through `peftkit train` (`run_training`) and through
`MultiJobTrainer` with its own steps applied, or is refused by name before any work; one method trained through
`run_training`, `MultiJobTrainer` alone and Hugging Face's `Trainer` (with `MethodSteps`) ends with the same adapter."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from peftkit.core.config import METHODS
from peftkit.core.registry import adapter_deltas
from peftkit.core.targets import TargetError
from peftkit.methods import AdaLoRAController
from peftkit.methods.reparameterized.sora import SoRADelta
from peftkit.methods.selective.selection import candidates
from peftkit.methods.selective.sparse import SparseDelta
from peftkit.train import Callback, TrainConfigError, config_from_mapping, prepare, run_training
from peftkit.train.concurrent import JobError, MultiJobTrainer, task_job
from peftkit.train.engine import TrainingError
from peftkit.train.hf import MethodSteps
from peftkit.train.trainer import adapter_state
from tests.train_models import tiny_config

QV = ["query", "value"]
FRACTION = 0.02
# Each method's config for the tiny BERT (hidden size 16), and what its own step leaves behind.
CONFIGS: dict[str, dict[str, Any]] = {
    "bottleneck": {"bottleneck": 4, "targets": ["output.dense"]},
    "ia3": {"targets": ["key", "value", "output.dense"], "feedforward": ["output.dense"]},
    "prefix_tuning": {"num_virtual_tokens": 4}, "prompt_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4},
    "ssf": {"targets": ["type:Linear", "type:LayerNorm"], "exclude": ["classifier"]},
    "bitfit": {"targets": ["type:Linear"], "exclude": ["classifier"]}, "layernorm": {}, "lastk": {"k": 1},
    "child_tuning_d": {"targets": QV, "fraction": FRACTION}, "child_tuning_f": {"targets": QV, "p": 0.3},
    "diff_pruning": {"targets": QV, "fraction": FRACTION}, "fishmask": {"targets": QV, "fraction": FRACTION},
    "fishdip": {"targets": QV, "fraction": FRACTION, "samples": 4, "every": 3},
    "ltsft": {"targets": QV, "fraction": FRACTION}, "pafi": {"targets": QV, "fraction": FRACTION},
    "structured": {"fraction": 0.5, "units": ["heads"]},
    "lora": {"targets": QV, "r": 2}, "adalora": {"targets": QV, "init_r": 4, "target_r": 2},
    "compacter": {"targets": QV, "phm_dim": 2, "phm_rank": 2}, "krona": {"targets": QV, "a_shape": (4, 4)},
    "dora": {"targets": QV, "r": 2}, "vera": {"targets": QV, "r": 8}, "dylora": {"targets": QV, "r_min": 1, "r_max": 4},
    "loha": {"targets": QV, "r": 2}, "lokr": {"targets": QV, "r": 2}, "oft": {"targets": QV, "oft_block_size": 4},
    "lorafa": {"targets": QV, "r": 2}, "loraplus": {"targets": QV, "r": 2}, "relora": {"targets": QV, "restart_every": 3},
    "sora": {"targets": QV, "r": 4}, "lora_moe": {"targets": QV, "experts": 2, "top_k": 1, "r": 2},
    "compose": {"parts": [{"method": "lora", "targets": QV, "r": 2},
                          {"method": "bottleneck", "bottleneck": 4, "targets": ["output.dense"]}], "gates": "learned"},
    "unipelt": {"r": 2, "num_virtual_tokens": 4, "bottleneck": 4}, "mam": {"num_virtual_tokens": 4, "bottleneck": 4},
    "lst": {"reduction": 4},
    "layer_groups": {"groups": [[{"method": "lora", "targets": QV, "r": 2}],
                                [{"method": "bottleneck", "bottleneck": 4, "targets": ["output.dense"]}]],
                     "shape": "uniform"},
}
LLAMA = {"llama_adapter": {"adapter_len": 2, "adapter_layers": 1}}  # Llama attention only: the chat task
CHAT = {**LLAMA, "lora": {"targets": ["q_proj", "v_proj"], "r": 2}, "prompt_tuning": {"num_virtual_tokens": 4},
        "prefix_tuning": {"num_virtual_tokens": 4}, "ia3": {"targets": ["k_proj", "v_proj", "down_proj"],
                                                           "feedforward": ["down_proj"]}, "lst": {"reduction": 4}}
# Vision transformer methods: trained on a tiny Dinov2 classifying Fashion-MNIST, refused by name on the BBC BERT.
VISION = {"vpt": {"num_tokens": 2}, "convpass": {"dim": 4}}
NOT_ON_TEXT = {"vpt": "embeds no image patches", "convpass": "has no patch embedding"}
REFUSED = {"adapter_fusion": "adapters: Field required",  # fuses adapters trained before: nothing to fuse here
           "bitdelta": "bitdelta is not trained by peftkit train: it compresses a finished fine-tune",
           "qalora": "qalora is not trained by peftkit train: it trains on a grouped-INT4 base",
           "merged_diff": "merged_diff is not trained by peftkit train: it is the result of a merge",
           **{clip: f"{clip} is not trained by peftkit train: it adapts a CLIP image classifier"  # not a BERT one
              for clip in ("coop", "cocoop", "clip_adapter", "tip_adapter")}}
STEPS = 8  # 16 rows in batches of 4, 2 epochs


def test_every_registered_method_has_a_case_here() -> None:
    assert set(METHODS) == set(CONFIGS) | set(LLAMA) | set(REFUSED) | set(VISION)


def sparse_counts(model) -> tuple[int, int]:
    """(entries the adapter trains, its candidate entries); every trained entry set must have moved from zero."""
    diffs = [diff for _, _, d in adapter_deltas(model, "default") if isinstance(d, SparseDelta) for _, diff in d.diffs()]
    assert any(diff.values.abs().max() > 0 for diff in diffs if diff.values.numel())
    return sum(diff.values.numel() for diff in diffs), sum(p.numel() for p in candidates(model, "default").values())


def chosen_share(model, optimizer) -> None:  # a mask chosen from data (or magnitudes), then trained
    trained, total = sparse_counts(model)
    assert trained == round(FRACTION * total)


def units_chosen(model, optimizer) -> None:
    trained, total = sparse_counts(model)
    assert 0 < trained < total


def ranks_pruned(model, optimizer) -> None:  # AdaLoRA's budget schedule reached its target rank
    ranks = AdaLoRAController(model).ranks()
    assert sum(ranks.values()) == 2 * len(ranks)


def gates_zeroed(model, optimizer) -> None:  # SoRA's proximal step
    gates = torch.cat([d.gate.detach() for _, _, d in adapter_deltas(model, "default") if isinstance(d, SoRADelta)])
    assert (gates == 0).any()


def fast_b_group(model, optimizer) -> None:  # LoRA+'s learning-rate groups
    lrs = sorted(group["initial_lr"] if "initial_lr" in group else group["lr"] for group in optimizer.param_groups)
    assert lrs[-1] == pytest.approx(16 * lrs[0])


OBSERVED: dict[str, Callable[[Any, Any], None]] = {
    "fishmask": chosen_share, "fishdip": chosen_share, "child_tuning_d": chosen_share, "pafi": chosen_share,
    "ltsft": chosen_share, "diff_pruning": chosen_share, "structured": units_chosen, "adalora": ranks_pruned,
    "sora": gates_zeroed, "loraplus": fast_b_group,
}


def base_state(model) -> dict[str, torch.Tensor]:
    adapter = adapter_state(model)
    return {k: v.clone() for k, v in model.state_dict().items() if k not in adapter}


def assert_base(model, before: dict[str, torch.Tensor], method: str) -> None:
    """The base is untouched by training, except by ReLoRA, whose restarts merge into it."""
    changed = [k for k, v in base_state(model).items() if not torch.equal(v, before[k])]
    assert bool(changed) == (method == "relora"), changed[:3]


def config(tmp_path, method: str, kind: str = "bbc", **sections) -> dict[str, Any]:
    if kind == "vit":
        return tiny_config(tmp_path, task="classify-image", model={"name": "tiny-dinov2"},
                           method={"method": method, **VISION[method]},
                           data={"name": "fashion-mnist", "train_limit": 16, "eval_limit": 4, "image_size": 16},
                           **sections)
    if kind == "chat":
        return tiny_config(tmp_path, task="causal-lm-chat", model={"name": "tiny-llama"},
                           method={"method": method, **CHAT[method]},
                           data={"name": "chatterbot", "train_limit": 16, "eval_limit": 4, "max_length": 96},
                           **sections)
    return tiny_config(tmp_path, method={"method": method, **CONFIGS.get(method, {})},
                       data={"train_limit": 16, "eval_limit": 4}, **sections)


RUN = {"schedule": {"epochs": 2, "batch_size": 4}, "optimizer": {"lr": 0.05}, "output": {"save": False},
       "eval": {"before": False, "restore_best": False}}


class KeepOptimizer(Callback):
    def on_train_begin(self, trainer) -> None:
        self.optimizer = trainer.optimizer


CASES = [(m, "bbc") for m in CONFIGS] + [(m, "chat") for m in CHAT] + [(m, "vit") for m in VISION]


@pytest.mark.parametrize("method, kind", CASES, ids=[f"{m}-{kind}" for m, kind in CASES])
def test_method_trains_through_peftkit_train_and_multijob_with_its_own_steps(tmp_path, method: str, kind: str) -> None:
    cfg = config(tmp_path, method, kind, **RUN)
    model, _, task, data = prepare(config_from_mapping(cfg))  # the same initial model the run starts from
    initial, base = {k: v.clone() for k, v in adapter_state(model).items()}, base_state(model)

    kept = KeepOptimizer()
    result = run_training(cfg, callbacks=[kept])
    assert result.steps == STEPS and all(torch.isfinite(torch.tensor(v)) for v in result.after.values())
    moved = [k for k, v in adapter_state(result.model).items() if k in initial and not torch.equal(v, initial[k])]
    assert moved, f"{method}: no adapter tensor moved through peftkit train"
    assert_base(result.model, base, method)
    if method in OBSERVED:
        OBSERVED[method](result.model, kept.optimizer)

    jobs = MultiJobTrainer(model)
    state = jobs.add(task_job(task, data.train, "default", batch_size=4, epochs=2, lr=0.05, seed=0))
    jobs.run()
    assert state.step == STEPS and all(torch.isfinite(torch.tensor(state.losses)))
    if kind != "chat":  # a classifier's head trains with every method; the tiny random Llama stays at ln(vocab)
        epochs = torch.tensor(state.losses).view(2, -1).mean(dim=1)  # the same 16 rows each epoch
        assert epochs[1] < epochs[0], f"{method}: the training loss did not fall ({epochs.tolist()})"
    moved = [k for k, v in adapter_state(model).items() if k in initial and not torch.equal(v, initial[k])]
    assert moved, f"{method}: no adapter tensor moved through MultiJobTrainer"
    assert_base(model, base, method)
    if method in OBSERVED:
        OBSERVED[method](model, state.optimizer)


@pytest.mark.parametrize("method", REFUSED)
def test_a_method_that_cannot_run_here_is_refused_by_name_before_any_work(tmp_path, method: str) -> None:
    with pytest.raises(TrainConfigError, match=REFUSED[method]):
        run_training(config(tmp_path, method, **RUN))


@pytest.mark.parametrize("method", NOT_ON_TEXT)
def test_a_vision_method_is_refused_on_a_text_model_by_name(tmp_path, method: str) -> None:
    cfg = tiny_config(tmp_path, method={"method": method, **VISION[method]}, data={"train_limit": 16, "eval_limit": 4},
                      **RUN)
    with pytest.raises(TargetError, match=NOT_ON_TEXT[method]):
        run_training(cfg)


def test_relora_is_refused_beside_other_jobs(tmp_path) -> None:
    from peftkit import LoRA, attach

    model, _, task, data = prepare(config_from_mapping(config(tmp_path, "relora", **RUN)))
    attach(model, LoRA(targets=QV, r=2), name="other")
    jobs = MultiJobTrainer(model)
    jobs.add(task_job(task, data.train, "other", batch_size=4))
    with pytest.raises(JobError, match="'default' \\(relora\\) writes into the base weights.*train it alone"):
        jobs.add(task_job(task, data.train, "default", batch_size=4))


def test_two_phase_methods_are_refused_by_the_hf_callback(tmp_path) -> None:
    model, *_ = prepare(config_from_mapping(config(tmp_path, "ltsft", **RUN)))
    with pytest.raises(TrainingError, match="ltsft trains in two phases"):
        MethodSteps(model, total_steps=STEPS)


def hf_rows(data) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i] for k, v in data.train.items()} for i in range(len(data.train["labels"]))]


def train_with_hf(cfg: dict[str, Any], tmp_path) -> Any:
    """The same run under `transformers.Trainer`: same initial model, same batches in the same order, same AdamW and
    linear schedule, no clipping; the method's steps through `MethodSteps`."""
    from torch.utils.data import Sampler
    from transformers import Trainer, TrainingArguments

    model, _, task, data = prepare(config_from_mapping(cfg))
    rows = hf_rows(data)

    class SeededOrder(Sampler):  # peftkit's order: one permutation per epoch from a generator seeded once
        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(0)  # the config's seed

        def __iter__(self):
            return iter(torch.randperm(len(rows), generator=self.generator).tolist())

        def __len__(self) -> int:
            return len(rows)

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SeededOrder()

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=0.05, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                             max_grad_norm=0.0, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             logging_strategy="no", dataloader_drop_last=False)
    steps = MethodSteps(model, "default", total_steps=STEPS)
    OrderedTrainer(model=model, args=args, train_dataset=rows, callbacks=[steps],
                   optimizers=(steps.optimizer(args), None)).train()
    return model


@pytest.mark.parametrize("method", ["adalora", "sora", "loraplus"])
def test_peftkit_train_multijob_and_hf_trainer_give_the_same_adapter(tmp_path, method: str) -> None:
    cfg = config(tmp_path, method, **{**RUN, "schedule": {"epochs": 2, "batch_size": 4, "scheduler": "linear"}})
    ours = adapter_state(run_training(cfg).model)

    model, _, task, data = prepare(config_from_mapping(cfg))
    jobs = MultiJobTrainer(model)
    linear = lambda optimizer, total: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total))
    adamw = lambda groups: torch.optim.AdamW(groups, lr=0.05, weight_decay=0.0)  # the config's (torch's default: 0.01)
    jobs.add(task_job(task, data.train, "default", batch_size=4, epochs=2, lr=0.05, seed=0, optimizer=adamw,
                      schedule=linear))
    jobs.run()
    multijob = adapter_state(model)

    hf = adapter_state(train_with_hf(cfg, tmp_path))
    assert ours.keys() == multijob.keys() == hf.keys()
    moved = [k for k in ours if not torch.equal(ours[k], adapter_state(prepare(config_from_mapping(cfg))[0])[k])]
    assert moved
    for key in ours:
        torch.testing.assert_close(multijob[key], ours[key], rtol=1e-4, atol=1e-6, msg=f"MultiJobTrainer: {key}")
        torch.testing.assert_close(hf[key], ours[key], rtol=1e-4, atol=1e-6, msg=f"HF Trainer: {key}")


def test_a_method_with_its_own_steps_beside_another_job_equals_it_alone(tmp_path) -> None:
    """AdaLoRA's rank allocation and orthogonality loss act on its own run only when jobs share forward passes."""
    from peftkit import LoRA, attach

    cfg = config(tmp_path, "adalora", **RUN)

    def train(with_other: bool) -> dict[str, torch.Tensor]:
        model, _, task, data = prepare(config_from_mapping(cfg))
        jobs = MultiJobTrainer(model)
        if with_other:
            attach(model, LoRA(targets=QV, r=2), name="other")
            jobs.add(task_job(task, data.train, "other", batch_size=4, epochs=2, lr=0.05, seed=1))
        jobs.add(task_job(task, data.train, "default", batch_size=4, epochs=2, lr=0.05, seed=0))
        jobs.run()
        return {k: v for k, v in adapter_state(model).items() if ".default." in k}

    alone, beside = train(False), train(True)
    for key in alone:
        torch.testing.assert_close(beside[key], alone[key], rtol=1e-4, atol=1e-6, msg=key)
