"""Data-parallel adapter training on `torch.distributed` (launched by torchrun): gloo on CPU, NCCL on GPU.

Every process holds the frozen backbone and the adapters; each takes its contiguous share of every
job's batch (`MultiJobTrainer(shard=...)`), so one or many concurrent jobs train data-parallel the
same way. Only adapter state crosses processes: the adapters are broadcast from rank 0 at the
start (so every rank starts from the same random init), and after backward the adapter gradients,
flattened into buckets, are summed. The trainer divides each job's gradient by the job's global
unit count (rows or tokens), so the sum is exactly the gradient of the global batch's mean loss:
the result equals one process trained on the same global batches. Rank 0 alone writes adapters,
and refuses one whose saved tensors are all empty (what a sharded ZeRO-3 / FSDP parameter looks like
unless it is gathered first), instead of writing an empty adapter file.

    torchrun --nproc_per_node 2 -m peftkit.train.distributed my_jobs.py:build --output runs/dp

`build()` returns `(model, jobs)`: the model with the jobs' adapters attached and a list of `Job`s.
The config trainer (`peftkit train CONFIG.yaml`) uses the same gradient sum under torchrun.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..api import adapter_parameters
from ..core.io import adapter_tensors, save
from ..core.registry import adapter_deltas
from .concurrent import Job, JobState, MultiJobTrainer

BUCKET_BYTES = 25 * 2**20  # as DDP's default bucket size


class NoAdapterParametersError(ValueError):
    """An adapter with no parameter values to train or synchronise (none, or all of size zero)."""


class EmptyAdapterError(ValueError):
    """Saving would write an adapter file with no values (e.g. ZeRO-3 / FSDP shards not gathered)."""


class ShardedAdapterError(EmptyAdapterError):
    """The adapter's tensors are FSDP2 shards (DTensor): this process does not hold the whole adapter."""


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank among `world_size` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(backend: str | None = None) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Backend: NCCL when CUDA is available, else gloo. Without torchrun's variables: one process,
    no process group (the same code then trains alone).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _buckets(tensors: list[torch.Tensor], limit: int) -> Iterable[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def _coalesced(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], None],
               bucket_bytes: int = BUCKET_BYTES) -> None:
    """Run `collective` in place on `tensors`, flattened into buckets of one dtype and device each."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for members in groups.values():
        for bucket in _buckets(members, bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            collective(flat)
            for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(part.view_as(t))


def _adapter_tensors(model: nn.Module, names: Iterable[str]) -> list[torch.Tensor]:
    """Parameters and buffers of the adapters (frozen random factors too: LoRA-FA's A)."""
    tensors = []
    for name in names:
        for _, _, delta in adapter_deltas(model, name):
            tensors.extend(t.data for t in delta.parameters())
            tensors.extend(t for t in delta.buffers())
    return tensors


class AdapterGradSync:
    """The `Sync` of a data-parallel `MultiJobTrainer`: sums loss statistics and adapter gradients.

    Only adapter gradients travel (the backbone is frozen and has none), in buckets of at most
    `bucket_bytes`. A parameter that got no gradient on this process (its job had no rows here)
    counts as zero, so every process runs the same collectives.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], bucket_bytes: int = BUCKET_BYTES):
        self.bucket_bytes = bucket_bytes
        for name in names:
            if sum(p.numel() for p in adapter_parameters(model, name)) == 0:
                raise NoAdapterParametersError(
                    f"adapter {name!r} has no parameter values on this process (none, or all of size zero, as "
                    "sharded ZeRO-3 / FSDP parameters are): nothing to train or synchronise")

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized():
            return values
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
        total = values.to(device, copy=True)
        dist.all_reduce(total)
        return total.to(values.device)

    @torch.no_grad()
    def grads(self, params: list[nn.Parameter]) -> None:
        if not dist.is_initialized():
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _coalesced([p.grad for p in params], dist.all_reduce, self.bucket_bytes)


@torch.no_grad()
def broadcast_adapters(model: nn.Module, names: Iterable[str], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Give every process rank 0's adapter values (parameters and buffers)."""
    if dist.is_initialized():
        _coalesced(_adapter_tensors(model, names), lambda flat: dist.broadcast(flat, src=0), bucket_bytes)


def check_saveable(model: nn.Module, name: str) -> None:
    """Refuse an adapter whose saved form holds no values (what an ungathered ZeRO-3 / FSDP shard gives)."""
    tensors = adapter_tensors(model, name)
    sharded = [key for key, t in tensors.items() if isinstance(t, DTensor)]
    if sharded:
        raise ShardedAdapterError(
            f"adapter {name!r} is sharded across processes ({sharded[0]} is a DTensor, as after FSDP2's fully_shard): "
            "gather it first, e.g. torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True)) loaded into an unsharded copy, and save that")
    if not tensors or all(t.numel() == 0 for t in tensors.values()):
        raise EmptyAdapterError(
            f"adapter {name!r} would be saved with no values ({len(tensors)} tensors, all empty): its parameters "
            "look sharded (ZeRO-3 / FSDP); gather the full parameters before saving")


def save_from_main(model: nn.Module, path: str | os.PathLike, name: str, ctx: DistContext, **kwargs) -> None:
    """Save one adapter from rank 0 only; every rank checks it first (so none waits on a failed save)."""
    check_saveable(model, name)
    if ctx.is_main:
        save(model, path, name, **kwargs)
    ctx.barrier()


def train_data_parallel(model: nn.Module, jobs: list[Job], ctx: DistContext, max_rows: int | None = None,
                        on_finish: Callable[[JobState], None] | None = None) -> dict[str, JobState]:
    """Train `jobs` (concurrently when several) with every process taking its share of each batch."""
    names = [job.adapter for job in jobs]
    model.to(ctx.device)
    sync = AdapterGradSync(model, names)
    broadcast_adapters(model, names)
    trainer = MultiJobTrainer(model, max_rows=max_rows, shard=(ctx.rank, ctx.world_size), sync=sync,
                              on_finish=on_finish)
    for job in jobs:
        trainer.add(job)
    return trainer.run()


def _load_builder(spec: str) -> Callable[[], tuple[nn.Module, list[Job]]]:
    """`path/to/file.py:function` or `package.module:function`."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"expected FILE.py:FUNCTION or MODULE:FUNCTION, got {spec!r}")
    if target.endswith(".py"):
        if not Path(target).is_file():
            raise FileNotFoundError(f"no such file: {target}")
        module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ValueError(f"{target} has no function {attr!r}")
    return builder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftkit.train.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builder", help="FILE.py:FUNCTION or MODULE:FUNCTION returning (model, jobs)")
    parser.add_argument("--output", required=True, help="directory; each job's adapter is saved to OUTPUT/<adapter>")
    parser.add_argument("--max-rows", type=int, default=None, help="at most this many rows per forward pass")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with CUDA, else gloo")
    args = parser.parse_args(argv)
    ctx = init_distributed(args.backend)

    def save_finished(state: JobState) -> None:  # every rank finishes a job at the same step
        path = Path(args.output) / state.job.adapter
        save_from_main(model, path, state.job.adapter, ctx)
        if ctx.is_main:
            print(f"{state.job.adapter}: {state.step} steps, loss {state.losses[0]:.4f} -> {state.losses[-1]:.4f}; "
                  f"saved to {path}", flush=True)

    try:
        model, jobs = _load_builder(args.builder)()
        for job in jobs:  # fail before training, not after it
            check_saveable(model, job.adapter)
        train_data_parallel(model, jobs, ctx, args.max_rows, on_finish=save_finished)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
