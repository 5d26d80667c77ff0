"""Data movement that torch's eager CPU kernels do slowly, done by a kernel torch.compile generates; exact.

Torch's eager CPU transpose copies element by element: a 2048 x 1536 float32 activation takes ~4 ms, ten
times a plain copy of it. The kernel Inductor generates for the same copy moves tiles through vector registers
(~1 ms). Sampled weight gradients need both operands transposed, so this is most of what they cost.

The compiled kernel is used where it is safe and pays: large CPU floating-point tensors, outside a region that
is itself being compiled, on the thread that compiled it (torch.compile is not thread safe). Everything else, a
machine without a C++ compiler, or `PEFTKIT_COMPILE=0` in the environment takes the eager copy; the result is
the same bits either way.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

COMPILE_ENV = "PEFTKIT_COMPILE"
COMPILED_MIN_ELEMENTS = 1 << 18  # below this the eager copy costs well under a millisecond


def _transpose(x: torch.Tensor) -> torch.Tensor:
    return x.t().contiguous()


class _CompiledTranspose:
    """torch.compile of `_transpose`, built on first use, with symbolic sizes: one kernel per dtype, whatever the
    shapes (a kernel per shape would run into dynamo's recompile limit; it is no more than ~1% of a step faster)."""

    def __init__(self) -> None:
        self._fn = None
        self._owner: int | None = None
        self._failed = False
        self._lock = threading.Lock()

    def usable(self, x: torch.Tensor) -> bool:
        if self._failed or os.environ.get(COMPILE_ENV, "1") == "0":
            return False
        if x.device.type != "cpu" or not x.is_floating_point() or x.dim() != 2 or min(x.shape) < 2 \
                or not x.is_contiguous() or x.numel() < COMPILED_MIN_ELEMENTS:
            return False
        if torch.compiler.is_compiling():  # inside a compiled region Inductor fuses the copy by itself
            return False
        if x.requires_grad and torch.is_grad_enabled():  # the compiled call records no graph
            return False
        return self._owner is None or self._owner == threading.get_ident()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            if self._fn is None:
                self._owner = threading.get_ident()
                self._fn = torch.compile(_transpose, dynamic=True, fullgraph=True)
            try:
                return self._fn(x.detach())  # detached: no guard on requires_grad, so no recompile for it
            except Exception as error:  # no compiler, an unsupported platform: the eager copy gives the same bits
                self._failed = True
                reason = (str(error).strip().splitlines() or [""])[0][:300]
                warnings.warn(f"peftkit: the compiled transpose is unavailable ({type(error).__name__}: {reason}); "
                              f"using torch's eager copy from now on (same results, slower sparse gradients)",
                              RuntimeWarning, stacklevel=3)
                return _transpose(x)


_compiled = _CompiledTranspose()


def transposed(x: torch.Tensor) -> torch.Tensor:
    """xᵀ of a 2-D tensor as a new contiguous tensor, bit for bit (compiled where that is safe and pays)."""
    return _compiled(x) if _compiled.usable(x) else _transpose(x)
