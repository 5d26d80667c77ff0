"""peftkit's on-disk cache: converted models, each built once into place."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models are kept: ``$PEFTKIT_CACHE``, else ``~/.cache/peftkit``."""
    return Path(os.environ.get("PEFTKIT_CACHE") or Path.home() / ".cache" / "peftkit").expanduser()


def cached(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_dir()/name``, built once by ``build(tmp)``.

    Building into a temporary folder beside the target and renaming it into place means a
    reader never sees a half-written copy, and concurrent builders cannot corrupt each other.
    """
    target = cache_dir() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        # Another process renamed its complete copy into place first: use theirs.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
