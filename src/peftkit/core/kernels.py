"""CPU kernels for what torch's eager kernels do slowly, each with torch's own way as the fallback.

`transposed`: torch's eager CPU transpose copies element by element: a 2048 x 1536 float32 activation takes ~4 ms, ten
times a plain copy of it. The kernel Inductor generates for the same copy moves tiles through vector registers
(~1 ms). Sampled weight gradients need both operands transposed, so this is most of what they cost.

The compiled kernel is used where it is safe and pays: large CPU floating-point tensors, outside a region that
is itself being compiled, on the thread that compiled it (torch.compile is not thread safe). Everything else, a
machine without a C++ compiler, or `PEFTKIT_COMPILE=0` in the environment takes the eager copy; the result is
the same bits either way.

`column_dots`: a[:, i]·b[:, j] at a list of (i, j), the values' gradient of a sparse weight change (gᵀx at the
mask). Torch's sampled product needs both operands transposed whole first, and a whole-tensor transpose of an
activation that has left the cache is slow; this C kernel (built once by the system compiler into peftkit's cache)
transposes 64 rows at a time into cache-resident scratch and takes contiguous dots there: 2-3x faster than the
transposes plus torch's sampled product at 0.5-10% of a MiniLM layer's entries, and faster than the dense gᵀx up
to ~13%. Its summation order differs from torch's, so results agree to float rounding, not bit for bit.
`PEFTKIT_COMPILE=0`, or a failed build (one warning), leaves the caller on torch's kernels.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from .cache import cached

COMPILE_ENV = "PEFTKIT_COMPILE"
COMPILED_MIN_ELEMENTS = 1 << 18  # below this the eager copy costs well under a millisecond


def _disabled() -> bool:
    """`PEFTKIT_COMPILE=0`: every kernel here leaves the work to torch."""
    return os.environ.get(COMPILE_ENV, "1") == "0"


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
        if self._failed or _disabled():
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


# --------------------------------------------------------------------------- column dot products

# out[k] = a[:, ia[k]] · b[:, ib[k]]. Each thread takes a contiguous share of the rows, 64 at a time: it copies the
# block's a and b transposed into its own scratch (small enough to stay in cache, so the copy is cheap, unlike a
# transpose of the whole tensor), then every k is one contiguous dot of 64 added into its own row of `partial`.
# The partials are added in thread order, so a run gives the same bits every time.
_COLUMN_DOTS_SOURCE = r"""
#define BLOCK 64
#define STRIP 16

static void block_transposed(const float *restrict src, long cols, long used, float *restrict dst) {
    for (long c0 = 0; c0 < cols; c0 += STRIP) {
        long c1 = c0 + STRIP < cols ? c0 + STRIP : cols;
        for (long n = 0; n < BLOCK; n++)
            for (long c = c0; c < c1; c++) dst[c * BLOCK + n] = n < used ? src[n * cols + c] : 0.0f;
    }
}

void column_dots_f32(const float *restrict a, const float *restrict b, const int *restrict ia, const int *restrict ib,
                     float *restrict partial, float *restrict scratch, float *restrict out,
                     long rows, long a_cols, long b_cols, long count, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) {
        float *restrict acc = partial + (long)t * count;
        float *restrict a_t = scratch + (long)t * (a_cols + b_cols) * BLOCK, *restrict b_t = a_t + a_cols * BLOCK;
        long end = rows * (t + 1) / threads;
        for (long n0 = rows * t / threads; n0 < end; n0 += BLOCK) {
            long used = end - n0 < BLOCK ? end - n0 : BLOCK;
            block_transposed(a + n0 * a_cols, a_cols, used, a_t);
            block_transposed(b + n0 * b_cols, b_cols, used, b_t);
            for (long k = 0; k < count; k++) {
                const float *restrict x = a_t + (long)ia[k] * BLOCK, *restrict y = b_t + (long)ib[k] * BLOCK;
                float dot = 0.0f;
                #pragma omp simd reduction(+:dot)
                for (int n = 0; n < BLOCK; n++) dot += x[n] * y[n];
                acc[k] += dot;
            }
        }
    }
    for (long k = 0; k < count; k++) {
        float sum = 0.0f;
        for (int t = 0; t < threads; t++) sum += partial[(long)t * count + k];
        out[k] = sum;
    }
}
"""
_COLUMN_DOTS_BLOCK = 64  # BLOCK above: scratch rows per thread
_COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c99", "-shared", "-fPIC")


def _cpu_signature() -> str:
    """What a `-march=native` build depends on: the machine and its CPU's feature flags."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _build_native(source: str, symbol: str) -> ctypes.CDLL:
    """`source` built by the system C compiler into peftkit's cache (once per source, compiler and CPU) and loaded.
    Loaded after torch, its OpenMP calls resolve to torch's own runtime, so both share one thread pool."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([source, version, *_COMPILE_FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]

    def build(folder: Path) -> None:
        (folder / f"{symbol}.c").write_text(source)
        done = subprocess.run([compiler, *_COMPILE_FLAGS, f"{symbol}.c", "-o", f"{symbol}.so"], cwd=folder,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:300]}")

    return ctypes.CDLL(str(cached(f"kernel-{symbol}-{key}", build) / f"{symbol}.so"))


class _ColumnDots:
    """The built `column_dots_f32`, loaded on first use; unavailable after a failed build (one warning)."""

    def __init__(self) -> None:
        self._fn = None
        self._failed = False
        self._lock = threading.Lock()

    def usable(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        if self._failed or _disabled():
            return False
        return len(a) == len(b) and all(
            t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2 and t.is_contiguous()
            and not (t.requires_grad and torch.is_grad_enabled()) for t in (a, b))  # the kernel records no graph

    def _load(self) -> None:
        if self._fn is not None or self._failed:  # loaded (or given up) already: no lock on the hot path
            return
        with self._lock:
            if self._fn is not None or self._failed:
                return
            try:
                fn = _build_native(_COLUMN_DOTS_SOURCE, "column_dots_f32").column_dots_f32
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                self._failed = True
                warnings.warn(f"peftkit: the column-dots kernel is unavailable ({type(error).__name__}: {error}); "
                              f"sparse gradients use torch's kernels from now on (same results, slower)",
                              RuntimeWarning, stacklevel=4)
                return
            fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 4 + [ctypes.c_int]
            fn.restype = None
            self._fn = fn

    def __call__(self, a: torch.Tensor, b: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor | None:
        self._load()
        if self._fn is None:
            return None
        if ia.dim() != 1 or ia.shape != ib.shape:
            raise ValueError(f"column_dots: ia and ib must be 1-D of one length, got {tuple(ia.shape)} and {tuple(ib.shape)}")
        ia, ib = ia.to(torch.int32).contiguous(), ib.to(torch.int32).contiguous()
        for name, index, columns in (("ia", ia, a.shape[1]), ("ib", ib, b.shape[1])):  # the kernel reads unchecked
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= columns):
                raise IndexError(f"column_dots: {name} must lie in [0, {columns}), got [{int(index.min())}, {int(index.max())}]")
        threads = max(1, min(torch.get_num_threads(), len(a)))
        partial = torch.zeros(threads, ia.numel())
        scratch = torch.empty(threads * (a.shape[1] + b.shape[1]) * _COLUMN_DOTS_BLOCK)
        out = torch.empty(ia.numel())
        self._fn(*(t.data_ptr() for t in (a, b, ia, ib, partial, scratch, out)),
                 len(a), a.shape[1], b.shape[1], ia.numel(), threads)
        return out


_column_dots = _ColumnDots()


def column_dots(a: torch.Tensor, b: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor | None:
    """a[:, ia[k]] · b[:, ib[k]] for every k, for a [rows, p] and b [rows, q]: (aᵀb) at the listed entries, the values'
    gradient of a sparse weight change, without forming aᵀb or transposing a or b whole. None where the kernel does
    not apply (not float32 on CPU, non-contiguous, a graph to record, disabled, no compiler): use torch's kernels."""
    return _column_dots(a, b, ia, ib) if _column_dots.usable(a, b) else None
