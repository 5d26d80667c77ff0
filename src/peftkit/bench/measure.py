"""What the benchmark measures around one training run, beyond the task metric.

Peak training memory on CPU: the process's resident-set high-water mark (Linux `VmHWM`) is reset
just before training (`/proc/self/clear_refs`, "5") and read just after; the peak minus the
resident size at the reset is what training added (activations, gradients, optimizer state).
Library code that the first backward pass pages in is resident memory too, but not training data:
the growth of file-backed pages (`RssFile`) over the block is subtracted (code is paged in at the
first step, before the peak, so this leaves the anonymous memory at the peak). Each cell runs in a
fresh worker process (see `worker`), so memory freed by an earlier cell and kept by the allocator
cannot hide part of a later cell's peak. Where `/proc` is unavailable the fallback is `ru_maxrss`,
which also counts model loading; the report names the method used. On a GPU the CUDA allocator's
own peak (`max_memory_allocated`) is exact and used instead.
"""
from __future__ import annotations

import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; an adapter's own parameters count in both."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def saved_bytes(save: Callable[[Path], object]) -> int:
    """Total size of the files `save(folder)` writes into a fresh temporary folder."""
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-size-") as tmp:
        folder = Path(tmp) / "saved"
        save(folder)
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise OSError(f"{field} not in {_STATUS}")


@dataclass
class PeakMemory:
    """Bytes a block of code added at its peak."""

    bytes: int = 0


_HOW = {"cuda": "CUDA max_memory_allocated growth",
        "vmhwm": "resident-set peak (Linux VmHWM, reset before training) minus the resident size at the reset, "
                 "less library code paged in meanwhile (RssFile growth)",
        "maxrss": "ru_maxrss growth (a lower bound: the peak before training cannot be reset here)"}


def _resettable_peak() -> bool:
    """Reset the resident-set peak to the current size; False where /proc does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM"), _status_kib("RssFile")
        return True
    except OSError:
        return False


def peak_memory_method() -> str:
    """How `peak_memory` measures in this environment, in words (the report prints it)."""
    return _HOW["cuda" if torch.cuda.is_available() else "vmhwm" if _resettable_peak() else "maxrss"]


@contextmanager
def peak_memory() -> Iterator[PeakMemory]:
    """Measure the peak memory the block adds (see the module docstring for how)."""
    result = PeakMemory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        result.bytes = torch.cuda.max_memory_allocated() - start
    elif _resettable_peak():  # the peak is now the current resident size
        start, code = _status_kib("VmHWM"), _status_kib("RssFile")
        yield result
        result.bytes = (_status_kib("VmHWM") - start - (_status_kib("RssFile") - code)) * 1024
    else:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        yield result
        result.bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) * 1024


def overhead_ratios(run: Callable[[], object], variants: dict[str, Callable[[], AbstractContextManager]],
                    rounds: int = 5) -> dict[str, float]:
    """Median time of `run()` under each variant, over the median under the first (the base).

    Variants are interleaved round by round, so a slow spell of a shared machine hits them alike;
    one warm-up call per variant is not timed.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds + 1):
        for name, context in variants.items():
            with context(), torch.inference_mode():
                start = time.perf_counter()
                run()
                elapsed = time.perf_counter() - start
            if round_index:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians[next(iter(variants))]
    return {name: value / base for name, value in medians.items()}
