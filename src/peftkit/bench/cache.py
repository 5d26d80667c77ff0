"""The benchmark's result cache: one JSON file per (method, task, config hash, seed).

A cell's key hashes everything that can change its numbers (the adapter config, the task, the
budget, the learning rate, the backend, the protocol version), so a rerun finds every cell it
already computed and a changed setting never reads a stale number. Files are written to a
temporary name and renamed into place: an interrupted run leaves whole cells or none, and the
next run resumes from them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

PROTOCOL_VERSION = 1  # bump when the measurement code changes what a cached number means


def config_hash(spec: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able cell spec (key order does not matter)."""
    canonical = json.dumps({"protocol": PROTOCOL_VERSION, **spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class ResultCache:
    """Cell results under `root/<task>/<method>/<hash>-seed<seed>.json`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, task: str, method: str, spec_hash: str, seed: int) -> Path:
        return self.root / task / method / f"{spec_hash}-seed{seed}.json"

    def get(self, task: str, method: str, spec_hash: str, seed: int) -> dict[str, Any] | None:
        """The cached result, or None; a file that does not parse (written by hand?) counts as missing."""
        path = self.path(task, method, spec_hash, seed)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def put(self, task: str, method: str, spec_hash: str, seed: int, result: dict[str, Any]) -> Path:
        path = self.path(task, method, spec_hash, seed)
        write_atomically(path, json.dumps(result, indent=1, sort_keys=True))
        return path


def write_atomically(path: Path, content: str | bytes) -> None:
    """Write `content` to `path` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
