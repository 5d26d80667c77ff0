"""Activation memory controls of `peftkit train` for every method: `model.gradient_checkpointing` (per block) gives
the same run as keeping the activations, for every registered method that trains, in fp32 and under bf16
autocast, or is refused by name (prefixes ride in the key/value cache, which checkpointed layers drop; LoRA-MoE's
forward records its balance loss, which a recomputation would record twice);
`model.offload_activations` (`torch.autograd.graph.save_on_cpu`) gives the same step and is refused off a GPU."""
from __future__ import annotations

import json

import pytest
import torch

from peftkit.train import TrainConfigError, config_from_mapping, prepare, run_training
from peftkit.train.engine import Engine, MicroBatch, Run, task_loss
from peftkit.train.trainer import adapter_state
from tests.test_engine import CASES, RUN, config

PREFIXED = {"prefix_tuning", "unipelt", "mam"}  # their prefix is passed to the layers in the key/value cache
REFUSED = {**{method: "passes its prefix to the layers in their key/value cache" for method in PREFIXED},
           "lora_moe": "lora_moe cannot use it: every forward records its load-balancing loss",
           "lst": "lst cannot use it: its backbone runs without gradients"}
CHECKPOINTED = [(method, chat) for method, chat in CASES if method not in REFUSED]


def train_losses(result) -> list[float]:
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if record["kind"] == "train"]


def checkpointed(cfg: dict, on: bool) -> dict:
    return {**cfg, "model": {**cfg["model"], "gradient_checkpointing": on}}


def assert_same_runs(cfg: dict, tmp_path) -> None:
    runs = [run_training(checkpointed({**cfg, "output": {**cfg["output"], "dir": str(tmp_path / str(on))}}, on))
            for on in (False, True)]
    assert runs[1].model.is_activation_checkpointing and not runs[0].model.is_activation_checkpointing
    kept, recomputed = (train_losses(run) for run in runs)
    assert len(kept) == runs[0].steps > 1
    assert recomputed == pytest.approx(kept, abs=1e-6)
    plain, again = (adapter_state(run.model) for run in runs)
    for key in plain:
        torch.testing.assert_close(again[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("method, chat", CHECKPOINTED, ids=[f"{m}-{'chat' if c else 'bbc'}" for m, c in CHECKPOINTED])
def test_checkpointing_gives_the_same_run_for_every_method(tmp_path, method: str, chat: bool) -> None:
    """The method's own steps included (selections, hooks, extra losses): losses per step and the adapter agree."""
    assert_same_runs(config(tmp_path, method, chat, **RUN), tmp_path)


@pytest.mark.parametrize("method, chat", [("lora", False), ("bottleneck", False), ("prompt_tuning", True)])
def test_checkpointing_under_bf16_autocast_gives_the_same_run(tmp_path, method: str, chat: bool) -> None:
    """The recomputation runs under the autocast the forward ran under, so bf16 numbers are recomputed alike."""
    assert_same_runs(config(tmp_path, method, chat, **RUN, precision="bf16", device="cpu"), tmp_path)


@pytest.mark.parametrize("method, chat", [(m, False) for m in sorted(REFUSED)] + [("prefix_tuning", True)])
def test_checkpointing_refuses_by_name_what_it_would_change(tmp_path, method: str, chat: bool) -> None:
    with pytest.raises(TrainConfigError, match=REFUSED[method]):
        prepare(config_from_mapping(checkpointed(config(tmp_path, method, chat, **RUN), True)))


class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """torch's save_on_cpu, counting the tensors it packs."""

    packed = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        pack = self.pack_hook

        def counting(tensor: torch.Tensor):
            CountingSaveOnCpu.packed += 1
            return pack(tensor)

        self.pack_hook = counting


@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_offloaded_activations_give_the_same_step(tmp_path, monkeypatch, method: str) -> None:
    """The engine's offload path (on CPU the copies stay in CPU memory, so only the numbers can be checked here):
    every saved activation goes through save_on_cpu's hooks, and the gradients, hence the step, are unchanged."""
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    monkeypatch.setattr(CountingSaveOnCpu, "packed", 0)
    cfg = config_from_mapping(config(tmp_path, method, **RUN))
    stepped = []
    for offload in (False, True):
        model, _, task, data = prepare(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        run = Run(model, "default", torch.optim.SGD(params, lr=0.1), None, total_steps=1)
        batch = task.collate(data.train, torch.arange(4))
        Engine(model, offload=offload).step([(run, [MicroBatch(run, task.inputs(batch), batch, 4, task_loss(task))])])
        stepped.append(adapter_state(model))
        assert (CountingSaveOnCpu.packed > 0) == offload
    for key in stepped[0]:
        assert torch.equal(stepped[1][key], stepped[0][key]), key


def test_offloading_activations_off_a_gpu_is_refused(tmp_path) -> None:
    cfg = config(tmp_path, "lora", **RUN, device="cpu")
    with pytest.raises(TrainConfigError, match="offload_activations moves the activations saved for backward"):
        run_training({**cfg, "model": {**cfg["model"], "offload_activations": True}})
