"""Adapters by name for a server: many registered, a bounded set loaded on the model, loads off the serving thread.

An adapter moves through: registered (a checked directory, nothing read) -> loading (a worker thread reads its config
and safetensors into memory) -> ready (attached to the model, inactive, routed per row) or failed (the reason kept).
Loaded adapters are evicted least recently used first when `max_loaded` or `max_bytes` would be exceeded; pinned
adapters and those in use never are. Only the thread that runs the model calls `prepare`, which is the one place
the model changes: attach + fill of finished reads and removals are quick, the disk reads happen beside it.
"""
from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..api import _check_name, adapters, attach, remove
from ..core import hf_peft
from ..core.config import AdapterConfig
from ..core.io import PEFTKIT_CONFIG, PEFTKIT_WEIGHTS, AdapterFileError, fill_adapter, read_adapter, read_json
from .requests import AdapterUnavailable, ServeError, UnknownAdapter

State = Literal["unloaded", "loading", "ready", "failed"]
Reader = Callable[[Path, nn.Module], tuple[AdapterConfig, dict[str, torch.Tensor], str | None]]
LAYOUTS = ((PEFTKIT_CONFIG, PEFTKIT_WEIGHTS), (hf_peft.CONFIG_FILE, hf_peft.WEIGHTS_FILE))
PEFT_SEQUENCE_TYPES = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"}  # PEFT's methods that add virtual tokens


class PathRefused(ServeError):
    """An adapter path outside the adapter root (`..`, an absolute path, a symlink pointing out)."""

    status = 403
    code = "permission_denied"


@dataclass
class _Read:
    """A finished read waiting to be attached."""

    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    nbytes: int


@dataclass(eq=False)
class _Adapter:
    name: str
    path: Path
    pinned: bool
    state: State = "unloaded"
    read: Future[_Read] | None = None
    failure: str | None = None
    nbytes: int = 0  # of its tensors, while loaded
    virtual_tokens: int | None = None  # read from its config when first asked


class AdapterStore:
    """Registered adapters of one model, loaded on demand within `max_loaded` adapters and `max_bytes` bytes."""

    def __init__(self, model: nn.Module, root: str | os.PathLike | None = None, max_loaded: int | None = None,
                 max_bytes: int | None = None, *, reader: Reader = read_adapter, read_workers: int = 2):
        for label, limit in (("max_loaded", max_loaded), ("max_bytes", max_bytes)):
            if limit is not None and limit < 1:
                raise ValueError(f"{label} must be at least 1 (or None for no limit), got {limit}")
        self.model = model
        self.root = None if root is None else Path(root).resolve()
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"adapter root {root} is not a directory")
        self.max_loaded, self.max_bytes = max_loaded, max_bytes
        self._reader = reader
        # PEFT-format reads match targets in the model's module tree; the workers read a weightless copy of it, since
        # the serving thread adds and removes delta modules on the real one while they run
        self._skeleton = _skeleton(model)
        self._pool = ThreadPoolExecutor(max_workers=read_workers, thread_name_prefix="adapter-read")
        self._lock = threading.Lock()
        self._adapters: dict[str, _Adapter] = {}
        self._loaded: OrderedDict[str, _Adapter] = OrderedDict()  # least recently used first
        self._doomed: list[str] = []  # unregistered while on the model: removed by the next `prepare`
        # kept apart so that `prepare` costs the same with thousands registered as with ten
        self._pinned: set[str] = set()
        self._loading: dict[str, _Adapter] = {}
        self._wanted: set[str] = set()
        self._in_use: set[str] = set()
        self._hits = self._misses = self._evictions = 0

    # --- any thread ---------------------------------------------------------------------------------------------
    def register(self, name: str, path: str | os.PathLike, pin: bool = False) -> None:
        """Add adapter `name` from directory `path` (checked, not read); it loads when first wanted."""
        try:
            _check_name(name)
        except ValueError as err:
            raise ServeError(str(err)) from None
        directory = self._checked_dir(Path(path))
        with self._lock:
            # an unregistered adapter still on the model leaves it at the next `prepare`, before any new one comes
            if name in self._adapters or (name in adapters(self.model) and name not in self._doomed):
                raise ServeError(f"an adapter named {name!r} is already registered; unregister it first or pick another name")
            self._adapters[name] = _Adapter(name, directory, pin)
            if pin:
                self._pinned.add(name)

    def unregister(self, name: str) -> None:
        """Forget adapter `name`; it leaves the model at the next `prepare`. Refused while requests use it."""
        with self._lock:
            adapter = self._require(name)
            if name in self._in_use or name in self._wanted:
                raise ServeError(f"adapter {name!r} is in use by running or queued requests; unregister it when they finish")
            del self._adapters[name]
            self._pinned.discard(name)
            self._loading.pop(name, None)
            if adapter.read is not None:
                adapter.read.cancel()  # a read already running finishes; its result is dropped
            if self._loaded.pop(name, None) is not None:
                self._doomed.append(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def pinned(self, name: str) -> bool:
        with self._lock:
            return self._require(name).pinned

    def check(self, name: str | None) -> None:
        """Raise UnknownAdapter for a name not registered, AdapterUnavailable for one whose load failed (None: the base)."""
        if name is None:
            return
        with self._lock:
            adapter = self._require(name)
            if adapter.state == "failed":
                raise AdapterUnavailable(adapter.failure)

    def state(self, name: str) -> State:
        """"unloaded" (registered, not wanted yet), "loading", "ready" (on the model) or "failed" (see `failure`)."""
        with self._lock:
            return self._require(name).state

    def failure(self, name: str) -> str | None:
        with self._lock:
            return self._require(name).failure

    def virtual_tokens(self, name: str) -> int:
        """Positions a prompt or prefix adapter adds in front of every request (0 for other methods), from its
        config file: known before the adapter is loaded, so an over-long request is refused when it arrives."""
        with self._lock:
            adapter = self._require(name)
            if adapter.virtual_tokens is None:
                try:
                    adapter.virtual_tokens = _virtual_tokens(adapter.path)
                except AdapterFileError as err:  # its load will fail the same way: refuse the request now
                    raise AdapterUnavailable(f"adapter {name!r}: {err}") from None
            return adapter.virtual_tokens

    def stats(self) -> dict[str, int]:
        """Cache counters: a hit or a miss each time an adapter becomes wanted, found loaded or not."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "evictions": self._evictions,
                    "loaded": len(self._loaded), "loaded_bytes": sum(a.nbytes for a in self._loaded.values())}

    def wait_reads(self, names: Iterable[str], timeout: float) -> None:
        """Block up to `timeout` seconds until the running reads of `names` finish (their attach is `prepare`'s):
        lets an idle serving loop sleep instead of spinning while it waits for adapters."""
        with self._lock:
            reads = [a.read for n in names if (a := self._adapters.get(n)) is not None and a.read is not None]
        if reads:
            wait_futures(reads, timeout=timeout)

    def close(self) -> None:
        """Stop the read workers (reads not started are dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    # --- the thread that runs the model -------------------------------------------------------------------------
    def release(self, wanted: Iterable[str], in_use: Iterable[str]) -> None:
        """Drop adapters no request uses any more from the in-use sets, at once (a request's client may unregister
        its adapter as soon as it has the final event); loading and eviction wait for the next `prepare`."""
        with self._lock:
            self._in_use &= set(in_use)
            self._wanted &= set(wanted) | self._pinned

    def prepare(self, wanted: Iterable[str], in_use: Iterable[str]) -> None:
        """Start reads of the wanted adapters not loaded, attach finished reads that fit, and evict least recently
        used adapters outside `in_use` and not pinned until the limits hold. Never waits for a read.

        `wanted`: adapters of queued and running requests; `in_use`: those of running requests (never evicted).
        Pinned adapters are always wanted. A finished read that would only fit by evicting a wanted adapter waits."""
        with self._lock:
            in_use = set(in_use)
            for name in [n for n in self._doomed if n not in in_use]:  # rows admitted before the unregister finish
                remove(self.model, name)
                self._doomed.remove(name)
            wanted = {n for n in wanted if n in self._adapters} | self._pinned
            self._in_use = in_use & wanted
            for name in wanted - self._wanted:
                adapter = self._adapters[name]
                if adapter.state == "ready":
                    self._hits += 1
                elif adapter.state != "failed":
                    self._misses += 1
            self._wanted = wanted
            for adapter in [a for a in self._loading.values() if a.read.done()]:
                self._attach(adapter)
            for name in wanted:  # after the attaches: a wanted adapter a pinned one evicted reads again
                self._want(self._adapters[name])

    def _want(self, adapter: _Adapter) -> None:
        if adapter.state == "ready":
            self._loaded.move_to_end(adapter.name)
        elif adapter.state == "unloaded":
            adapter.state, adapter.read = "loading", self._pool.submit(self._read, adapter.path)
            self._loading[adapter.name] = adapter

    def _read(self, directory: Path) -> _Read:
        """Worker thread: the adapter's config and tensors in memory (the directory checked again: it may have changed)."""
        config, tensors, _ = self._reader(self._checked_dir(directory), self._skeleton)
        return _Read(config, tensors, sum(t.numel() * t.element_size() for t in tensors.values()))

    def _attach(self, adapter: _Adapter) -> None:
        if adapter.name in self._doomed:  # its unregistered namesake still serves running rows: attach after them
            return
        try:
            read = adapter.read.result()
        except Exception as err:  # a refused path, a corrupt or misfitting file: this adapter fails, nothing else
            return self._fail(adapter, str(err))
        if not self._make_room(read.nbytes, adapter.name):
            return  # stays loading: tried again by the next `prepare`
        try:
            attach(self.model, read.config, name=adapter.name, activate=False)
        except Exception as err:  # does not fit the model, or out of memory: this adapter fails, the server goes on
            return self._fail(adapter, f"{adapter.path}: {type(err).__name__}: {err}")
        try:
            fill_adapter(self.model, adapter.name, read.tensors, adapter.path)
        except Exception as err:
            remove(self.model, adapter.name)
            return self._fail(adapter, str(err))
        adapter.state, adapter.read, adapter.nbytes = "ready", None, read.nbytes
        del self._loading[adapter.name]
        self._loaded[adapter.name] = adapter

    def _fail(self, adapter: _Adapter, why: str) -> None:
        adapter.state, adapter.read, adapter.failure = "failed", None, f"adapter {adapter.name!r} failed to load: {why}"
        self._loading.pop(adapter.name, None)

    def _make_room(self, nbytes: int, name: str) -> bool:
        """Whether an adapter of `nbytes` fits after evicting adapters nobody wants (for a pinned one: all but those
        in use); one that cannot fit even beside the pinned adapters alone fails (waiting would never help)."""
        pinning = self._adapters[name].pinned
        self._evict(lambda a: a.name in self._wanted and not pinning, nbytes)
        if self._fits(self._loaded.values(), nbytes):
            return True
        pinned = [a for a in self._loaded.values() if a.pinned]
        if not self._fits(pinned, nbytes):
            self._fail(self._adapters[name], f"its tensors ({nbytes:,} bytes) do not fit the adapter limits "
                                             f"(max_loaded={self.max_loaded}, max_bytes={self.max_bytes}) beside "
                                             f"the {len(pinned)} pinned adapters")
        return False

    def _fits(self, kept: Iterable[_Adapter], nbytes: int) -> bool:
        """Whether the loaded adapters `kept` and one more of `nbytes` bytes hold within the limits."""
        kept = list(kept)
        return ((self.max_loaded is None or len(kept) < self.max_loaded)
                and (self.max_bytes is None or sum(a.nbytes for a in kept) + nbytes <= self.max_bytes))

    def _evict(self, spare: Callable[[_Adapter], bool], nbytes: int) -> None:
        """Remove least recently used adapters (never pinned or in use, nor any `spare` keeps) until one more of
        `nbytes` bytes fits."""
        for adapter in list(self._loaded.values()):
            if self._fits(self._loaded.values(), nbytes):
                return
            if adapter.pinned or adapter.name in self._in_use or spare(adapter):
                continue
            remove(self.model, adapter.name)
            del self._loaded[adapter.name]
            adapter.state, adapter.nbytes = "unloaded", 0
            self._evictions += 1

    # --- checks ---------------------------------------------------------------------------------------------------
    def _require(self, name: str) -> _Adapter:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise UnknownAdapter(f"no adapter named {name!r} is registered (GET /v1/models lists the base model "
                                 f"and the adapters)")
        return adapter

    def _checked_dir(self, path: Path) -> Path:
        """`path` (relative to the root, if one is set) when it is an adapter directory inside the root."""
        candidate = path if self.root is None or path.is_absolute() else self.root / path
        directory = self._inside_root(candidate, path)
        if not directory.is_dir():
            where = f" (taken relative to the adapter root: {candidate})" if candidate != path else ""
            raise ServeError(f"adapter path {path} is not a directory{where}")
        present = [(config, weights) for config, weights in LAYOUTS if (directory / config).is_file()]
        if not present:
            raise ServeError(f"{path} holds no adapter: expected {PEFTKIT_CONFIG} or {hf_peft.CONFIG_FILE}")
        config, weights = present[0]
        if not (directory / weights).is_file():
            pickled = (directory / weights).with_suffix(".bin")
            hint = (f"; it has {pickled.name}, a pickle, which is never loaded: re-save the adapter as safetensors"
                    if pickled.exists() else "")
            raise ServeError(f"{path} lacks the adapter weights file {weights}{hint}")
        for name in (config, weights):  # a file may be a symlink pointing out of the root
            self._inside_root(directory / name, path)
        return directory

    def _inside_root(self, candidate: Path, given: Path) -> Path:
        resolved = candidate.resolve()
        if self.root is not None and not resolved.is_relative_to(self.root):
            raise PathRefused(f"adapter path {given} is outside the adapter root {self.root}")
        return resolved


def _virtual_tokens(directory: Path) -> int:
    """`num_virtual_tokens` of a prompt-learning adapter's config (peftkit's or PEFT's layout), else 0."""
    for config_file, _ in LAYOUTS:
        if (directory / config_file).is_file():
            data = read_json(directory / config_file)
            config = data.get("config", data)
            sequence = config.get("targets") == "sequence" or config.get("peft_type") in PEFT_SEQUENCE_TYPES
            return int(config.get("num_virtual_tokens") or 0) if sequence else 0
    return 0


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree whose tensors are on the meta device (no weights copied)."""
    memo: dict[int, torch.Tensor] = {id(b): torch.empty_like(b, device="meta") for b in model.buffers()}
    memo.update({id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False) for p in model.parameters()})
    return copy.deepcopy(model, memo)
