"""Data-parallel training: 2 processes (torchrun, gloo) give the same adapters as one process on the same global batches.

`build` below is also the job builder the torchrun processes load (`tests/test_distributed.py:build`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.core.io import PEFTKIT_WEIGHTS, adapter_tensors
from peftkit.train import run_training
from peftkit.train.concurrent import Job
from peftkit.train.distributed import (AdapterGradSync, DistContext, EmptyAdapterError, NoAdapterParametersError,
                                       ShardedAdapterError,
                                       _coalesced, check_saveable, save_from_main, train_data_parallel)

REPO = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.body = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12))
        self.head = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).mean(1)
        return self.head(h + self.body(h))


def _collate(data, idx):
    return data["ids"][idx], data["labels"][idx]


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _weighted_ce(out, y):
    weight = 1.0 + (y == 2).float()  # unequal units per row: the global unit count must be summed over ranks
    return _ce(out, y) * weight, weight


def build() -> tuple[nn.Module, list[Job]]:
    """Same backbone on every rank; adapter init differs per rank until rank 0's is broadcast."""
    torch.manual_seed(0)
    model = Net()
    ids = torch.randint(0, 30, (29, 4))
    data = {"ids": ids, "labels": ids[:, 0] % 3}
    torch.manual_seed(int(os.environ.get("RANK", 0)))
    peftkit.attach(model, peftkit.LoRA(r=4, targets=["body.0", "body.2"], init="gaussian", modules_to_save=["head"]), "lora")
    peftkit.attach(model, peftkit.Bottleneck(bottleneck=4, targets=["body.2"]), "adapter")
    # 29 rows in batches of 7: the 4/3 split is uneven and the last batch (1 row) leaves rank 1 with none
    return model, [Job("lora", data, _ce, _collate, batch_size=7, epochs=2, lr=1e-2, seed=1),
                   Job("adapter", data, _weighted_ce, _collate, batch_size=7, epochs=2, lr=1e-2, seed=2)]


def test_two_process_gloo_run_equals_one_process(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "peftkit.train.distributed", f"{Path(__file__)}:build", "--output", str(tmp_path)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("saved to") == 2  # rank 0 alone reports and saves

    model, jobs = build()
    initial = {name: {k: v.clone() for k, v in adapter_tensors(model, name).items()} for name in ("lora", "adapter")}
    train_data_parallel(model, jobs, DistContext())
    for name in ("lora", "adapter"):
        saved = load_file(str(tmp_path / name / PEFTKIT_WEIGHTS))
        alone = adapter_tensors(model, name)
        assert saved.keys() == alone.keys()
        for key, value in alone.items():
            torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-6, msg=key)
        assert any(not torch.allclose(alone[k], initial[name][k]) for k in alone), f"{name} did not train"


def test_config_trainer_under_torchrun_equals_one_process(tmp_path) -> None:
    """`run_training(CONFIG)` in 2 gloo processes (batches of 6 over 22 rows: uneven shards, a 4-row last batch)
    saves the adapter one process trains on the same batches; rank 0 alone writes the metrics and checkpoints."""
    from tests.train_models import tiny_config, write  # not at the top: torchrun loads this file as a job builder

    config = tiny_config(tmp_path, schedule={"epochs": 2, "batch_size": 6, "grad_accum": 2},
                         optimizer={"lr": 5e-2, "name": "adamw"}, output={"dir": str(tmp_path / "ddp")})
    config["data"].update(train_limit=22, eval_limit=9)
    path = write(tmp_path / "config.yaml", yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "train_ddp_entry.py"), str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1",
                                                       "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_training({**config, "output": {**config["output"], "dir": str(tmp_path / "alone")}})
    ddp_dir = tmp_path / "ddp"
    saved, expected = (load_file(str(d / "adapter" / PEFTKIT_WEIGHTS)) for d in (ddp_dir, tmp_path / "alone"))
    assert saved.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-6, msg=key)
    ddp, one = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
                for d in (ddp_dir, tmp_path / "alone"))
    assert [(r["kind"], r["step"]) for r in ddp] == [(r["kind"], r["step"]) for r in one]  # written once, by rank 0
    for mine, theirs in zip(ddp, one):  # training losses and the sharded evaluations sum to the whole batch's / set's
        assert abs(mine["loss"] - theirs["loss"]) < 1e-5 and mine.get("accuracy") == theirs.get("accuracy")
    assert (ddp_dir / "checkpoints" / "best").is_dir()


def _shard_like_zero3(model: nn.Module, name: str) -> None:
    for p in peftkit.adapter_parameters(model, name):
        p.data = torch.empty(0)


def test_sharded_or_empty_adapters_are_refused(tmp_path) -> None:
    model, _ = build()
    check_saveable(model, "lora")
    _shard_like_zero3(model, "lora")
    with pytest.raises(EmptyAdapterError, match="'lora' would be saved with no values.*gather"):
        save_from_main(model, tmp_path / "lora", "lora", DistContext())
    assert not (tmp_path / "lora").exists()
    with pytest.raises(NoAdapterParametersError, match="'lora' has no parameter values"):
        AdapterGradSync(model, ["adapter", "lora"])
    AdapterGradSync(model, ["adapter"])


def test_bucketed_collective_keeps_every_tensor() -> None:
    """Buckets of mixed sizes and dtypes: each tensor gets its own slice of the flat result back."""
    tensors = [torch.randn(3, 4), torch.randn(5), torch.arange(6, dtype=torch.float64).reshape(2, 3),
               torch.randn(0, 4), torch.randn(40)]
    expected = [2 * t for t in tensors]
    sizes = []

    def double(flat: torch.Tensor) -> None:
        sizes.append((flat.dtype, flat.numel()))
        flat.mul_(2)

    _coalesced(tensors, double, bucket_bytes=80)  # 20 float32 values per bucket
    for t, e in zip(tensors, expected):
        torch.testing.assert_close(t, e)
    assert sizes == [(torch.float32, 17), (torch.float32, 40), (torch.float64, 6)]  # 3 + 1 buckets


def test_builder_spec_errors() -> None:
    from peftkit.train.distributed import main

    with pytest.raises(ValueError, match="FILE.py:FUNCTION"):
        main(["no-colon", "--output", "x"])
    with pytest.raises(FileNotFoundError, match="missing.py"):
        main(["missing.py:build", "--output", "x"])
    with pytest.raises(ValueError, match="no function 'nope'"):
        main([f"{Path(__file__)}:nope", "--output", "x"])


def test_fsdp2_shards_are_refused(tmp_path) -> None:
    """After FSDP2's fully_shard the adapter's tensors are DTensor shards: saving them must not write a file."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, _ = build()
        fully_shard(model)
        with pytest.raises(ShardedAdapterError, match="'lora' is sharded.*DTensor.*full_state_dict"):
            save_from_main(model, tmp_path / "lora", "lora", DistContext())
        assert not (tmp_path / "lora").exists()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- peers: accelerate (DDP), FSDP2

PEER_ROWS, PEER_BATCH, PEER_STEPS = 24, 8, 3  # even splits: DDP and FSDP average the ranks' mean losses


def _lora_only() -> nn.Module:
    model, _ = build()
    peftkit.remove(model, "adapter")
    peftkit.activate(model, "lora")
    return model


def _peer_steps(model: nn.Module, optimizer, rank: int, world: int, backward=None) -> None:
    """A plain loop over `build`'s first rows: each rank takes its half of every global batch."""
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (PEER_ROWS, 4))
    model.eval()
    for idx in torch.arange(PEER_ROWS).split(PEER_BATCH):
        local = idx.tensor_split(world)[rank]
        loss = F.cross_entropy(model(ids[local]), ids[local, 0] % 3)
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        optimizer.zero_grad()


def _peer_run(out: Path) -> None:
    """Run by torchrun: train `lora` through accelerate's DDP, then through FSDP2 (gloo); rank 0 saves both."""
    from accelerate import Accelerator
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from peftkit.train.distributed import broadcast_adapters, init_distributed

    ctx = init_distributed()
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731

    accelerator = Accelerator(cpu=True)  # joins the process group torchrun set up
    assert accelerator.num_processes == 2, accelerator.distributed_type
    model = _lora_only()
    wrapped, optimizer = accelerator.prepare(model, torch.optim.AdamW(params(model), lr=1e-2))  # DDP: rank 0's init
    _peer_steps(wrapped, optimizer, ctx.rank, ctx.world_size, accelerator.backward)
    save_from_main(accelerator.unwrap_model(wrapped), out / "accelerate", "lora", ctx)

    model = _lora_only()
    broadcast_adapters(model, ["lora"])  # FSDP2 shards each rank's own values: start from rank 0's
    fully_shard(model)
    _peer_steps(model, torch.optim.AdamW(params(model), lr=1e-2), ctx.rank, ctx.world_size)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        plain = _lora_only()
        plain.load_state_dict(full)
        save_from_main(plain, out / "fsdp2", "lora", DistContext())
    ctx.barrier()  # rank 1 must not leave while rank 0 still saves
    # Tearing gloo down (destroy_process_group, or its destructors at exit) now and then aborted one rank with
    # "terminate called without an active exception" after all the work was done: leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_peer_data_parallel_recipes_on_cpu(tmp_path) -> None:
    """The README's recipes: accelerate (DDP) and FSDP2, both on gloo, train the adapter as one process does."""
    import accelerate  # noqa: F401  a hard dependency: missing, this fails here rather than in the workers
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__)), str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    model = _lora_only()
    start = {k: v.clone() for k, v in adapter_tensors(model, "lora").items()}
    _peer_steps(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), 0, 1)
    alone = adapter_tensors(model, "lora")
    assert any(not torch.allclose(alone[k], start[k]) for k in alone)
    for peer in ("accelerate", "fsdp2"):
        saved = load_file(str(tmp_path / peer / PEFTKIT_WEIGHTS))
        assert saved.keys() == alone.keys()
        for key, value in alone.items():
            torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-6, msg=f"{peer}: {key}")


if __name__ == "__main__":  # torchrun entry of test_peer_data_parallel_recipes_on_cpu
    _peer_run(Path(sys.argv[1]))
