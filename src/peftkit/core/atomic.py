"""Directories replaced as a whole: a process killed at any instant leaves the old one or the new one at the path.

The new directory is written beside the target as `.<name>.<host>-<pid>-<token>.tmp`, every file flushed to disk,
then swapped in. On Linux the swap is one `renameat2(RENAME_EXCHANGE)`: the path always names a complete directory,
and the old one is left under the temporary name, to be deleted. Where the kernel or filesystem lacks the
exchange, the old directory is first renamed aside to `.<name>.<host>-<pid>-<token>.old` and the new one renamed
into place; a kill between the two renames leaves no directory at the path, and the next `recover(path)` (every save
and load calls it) renames the old one back. `recover` also deletes what dead writers on this machine left behind;
a sibling whose writer is alive, or runs on another machine (a shared file system), is left alone.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import socket
import sys
import uuid
import zlib
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV}
# This machine, in temporary names: a writer's pid says whether it is alive only on the machine that runs it (the
# directory may be on a file system that other machines write to as well)
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _leftover(path: Path) -> re.Pattern:
    """Temporary siblings of `path` that writers on this machine made: groups (pid, "tmp" | "old")."""
    return re.compile(rf"\.{re.escape(path.name)}\.{_HOST}-(\d+)-[0-9a-f]{{32}}\.(tmp|old)")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def recover(path: Path) -> None:
    """Undo what a killed writer of `path` left: put back an old directory moved aside, delete temporary ones."""
    pattern = _leftover(path)
    try:
        siblings = sorted(path.parent.iterdir()) if path.parent.is_dir() else []
    except PermissionError:
        return  # a directory we cannot list holds nothing we could clean
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match is None or _alive(int(match[1])):
            continue
        if match[2] == "old" and not path.exists():
            os.replace(sibling, path)  # killed between the fallback's two renames: the old directory is complete
        else:
            shutil.rmtree(sibling, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2); False where the system cannot."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform.startswith("linux") else None
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _write(target: Path, content: Any) -> None:
    """One file: JSON for a dict of plain values, safetensors for a dict of tensors; on disk before it returns."""
    if target.suffix == ".json":
        target.write_text(json.dumps(content, indent=2, sort_keys=True))
    else:
        save_file(content, str(target), metadata={"format": "pt"})
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomically(path: Path, files: dict[str, Any]) -> None:
    """Write {filename: json-able dict | tensor dict} into directory `path`, replacing it as a whole."""
    path = Path(path)
    if path.is_symlink():  # replace what the link points to, and keep the link
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not an adapter directory; refusing to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover(path)
        tmp = path.parent / f".{path.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex}.tmp"
        tmp.mkdir()  # not mkdtemp: the directory keeps the user's umask (mkdtemp's 0700 would lock out readers)
    except PermissionError as err:
        where = err.filename or path.parent
        raise PermissionError(err.errno, f"cannot write {path}: {where} is not writable", str(where)) from None
    try:
        for filename, content in files.items():
            _write(tmp / filename, content)
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # it now holds the old directory
        else:
            old = tmp.with_suffix(".old")
            os.replace(path, old)  # a directory cannot be renamed onto a non-empty one: move the old one aside
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
