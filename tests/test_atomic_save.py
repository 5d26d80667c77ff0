"""Crash-safe saves: a process killed at any instant of `save` leaves the old adapter or the new one at the path.

The fault-injection test forks a child that saves over an existing adapter and kills itself (`os._exit`) just
before or just after the k-th file-system step of the save (each directory made, file written, fsync, rename,
exchange and removal), for every k until a save runs to its end; after each kill the path must load to the old
or the new adapter, and the next load must have cleaned every leftover. It runs with the atomic exchange and
with the two-rename fallback used where the system lacks it.
"""
from __future__ import annotations

import copy
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit import LoRA
from peftkit.core import atomic

from .conftest import randomize


class ConvNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def _adapter_files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def _old_and_new() -> tuple[nn.Module, nn.Module]:
    """One base with an adapter in two states: the one on disk (old) and the one being saved (new)."""
    torch.manual_seed(0)
    old = ConvNet()
    peftkit.attach(old, LoRA(r=2, targets=["0", "3"]))
    randomize(old)
    new = copy.deepcopy(old)
    randomize(new, scale=0.5)
    return old, new


def _output_after_load(model: nn.Module, path: Path, x: torch.Tensor) -> torch.Tensor:
    fresh = copy.deepcopy(model)
    peftkit.remove(fresh, "default")
    peftkit.load(fresh, path)  # also cleans what a killed save left
    return fresh(x).detach()


STEPS = {  # where a save touches the disk: (object, attribute) patched in the child
    "mkdir": (Path, "mkdir"), "write": (atomic, "_write"), "fsync": (os, "fsync"), "replace": (os, "replace"),
    "exchange": (atomic, "_exchange"), "rmtree": (shutil, "rmtree"),
}


def _save_and_die(model: nn.Module, path: Path, kill_at: int, after: bool, exchange: bool) -> None:
    """In a forked child: save, exiting at once before (or after) the `kill_at`-th disk step."""
    count = [0]

    def counted(real: Any) -> Any:
        def step(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            index = count[0]  # steps nest (a file write fsyncs): "after" is after this one's own return
            if index == kill_at and not after:
                os._exit(17)
            result = real(*args, **kwargs)
            if index == kill_at and after:
                os._exit(17)
            return result
        return step

    if not exchange:
        atomic._exchange = lambda a, b: False
    for owner, attribute in STEPS.values():
        setattr(owner, attribute, counted(getattr(owner, attribute)))
    peftkit.save(model, path)
    os._exit(0)  # the save ran to its end before step `kill_at`


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_killed_at_any_step_of_a_save_the_path_loads_old_or_new(exchange: bool, tmp_path: Path) -> None:
    old, new = _old_and_new()
    x = torch.randn(2, 3, 8, 8)
    expected = {"old": old(x).detach(), "new": new(x).detach()}
    fork, seen = multiprocessing.get_context("fork"), []
    for kill_at in range(1, 40):
        for after in (False, True):
            folder = tmp_path / f"{kill_at}-{after}"
            peftkit.save(old, folder / "adapter")
            child = fork.Process(target=_save_and_die, args=(new, folder / "adapter", kill_at, after, exchange))
            child.start()
            child.join()
            out = _output_after_load(old, folder / "adapter", x)
            found = [name for name, value in expected.items() if torch.equal(out, value)]
            where = f"killed {'after' if after else 'before'} step {kill_at}"
            assert found, f"{where}: the path holds neither adapter"
            assert os.listdir(folder) == ["adapter"], f"{where}: leftovers {os.listdir(folder)}"
            seen.append(found[0])
            if child.exitcode == 0:  # the save ran to its end before the kill: every step has been covered
                assert found == ["new"] and "old" in seen and kill_at > 5
                return
            assert child.exitcode == 17
    pytest.fail("the save never finished within 40 steps")


def test_a_save_killed_between_the_fallback_renames_is_put_back_by_the_next_save(tmp_path: Path) -> None:
    """Without the exchange, a kill between moving the old directory aside and the new one in leaves no directory
    at the path for a moment: the next save (like the next load) puts the old one back before anything else."""
    old, new = _old_and_new()
    path = tmp_path / "adapter"
    peftkit.save(old, path)
    aside = tmp_path / f".adapter.{atomic._HOST}-{2 ** 22 + 1}-{'0' * 32}.old"  # a dead writer's (no such pid)
    os.replace(path, aside)
    atomic.recover(path)
    assert os.listdir(tmp_path) == ["adapter"]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(_output_after_load(old, path, x), old(x), rtol=0, atol=0)


def test_a_live_or_remote_writers_temporary_directory_is_left_alone(tmp_path: Path) -> None:
    old, _ = _old_and_new()
    path = tmp_path / "adapter"
    peftkit.save(old, path)
    busy = tmp_path / f".adapter.{atomic._HOST}-{os.getppid()}-{'a' * 32}.tmp"  # our parent, alive, is writing it
    remote = tmp_path / f".adapter.{'f' * 8}-{2 ** 22 + 1}-{'b' * 32}.tmp"  # another machine's: its pid means nothing here
    busy.mkdir()
    remote.mkdir()
    peftkit.save(old, path)
    assert busy.is_dir() and remote.is_dir()


def test_read_only_destination_is_a_named_error(tmp_path: Path) -> None:
    old, _ = _old_and_new()
    if os.geteuid() == 0:  # root writes through file modes: use a file system that refuses everyone
        target = Path("/sys/peftkit-test/adapter")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        target = tmp_path / "ro" / "adapter"
    with pytest.raises(PermissionError, match=f"cannot write {target}: .* is not writable"):
        peftkit.save(old, target)


def test_save_over_existing_dir_replaces_it_wholly(tmp_path: Path) -> None:
    old, new = _old_and_new()
    path = tmp_path / "adapter"
    peftkit.save(old, path, format="peft")
    (path / "README.md").write_text("stale")
    peftkit.save(new, path)  # other format, other tensors, into the same directory
    assert sorted(os.listdir(path)) == ["adapter.safetensors", "peftkit_adapter.json"]
    assert os.listdir(tmp_path) == ["adapter"]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(_output_after_load(old, path, x), new(x), rtol=0, atol=0)


def test_saved_dir_has_ordinary_permissions(tmp_path: Path) -> None:
    """Readable like any directory the user makes (a temp dir would be 0700: unreadable by a serving user)."""
    old, _ = _old_and_new()
    peftkit.save(old, tmp_path / "adapter")
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "adapter").stat().st_mode == (tmp_path / "plain").stat().st_mode


@pytest.mark.parametrize("existing", [True, False])
def test_failed_save_leaves_previous_adapter_and_no_temp_dirs(
        existing: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = _old_and_new()
    path = tmp_path / "adapter"
    if existing:
        peftkit.save(old, path, format="peft")
    before = _adapter_files(path) if existing else None

    def half_written(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(atomic, "save_file", half_written)
    for fmt in ("peft", "peftkit"):
        with pytest.raises(OSError, match="disk full"):
            peftkit.save(new, path, format=fmt)
        assert os.listdir(tmp_path) == (["adapter"] if existing else [])
        if existing:
            assert _adapter_files(path) == before


def test_failed_fallback_swap_puts_previous_adapter_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure between moving the old directory aside and moving the new one in restores the old one."""
    old, new = _old_and_new()
    path = tmp_path / "adapter"
    peftkit.save(old, path)
    before = _adapter_files(path)
    real_replace, calls = os.replace, []

    def failing_replace(src: Any, dst: Any) -> None:
        calls.append(dst)
        if Path(dst) == path and len(calls) == 2:  # the new directory moving in, after the old one moved out
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        peftkit.save(new, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["adapter"] and _adapter_files(path) == before


def test_save_onto_a_file_is_refused(tmp_path: Path) -> None:
    old, _ = _old_and_new()
    (tmp_path / "adapter").write_text("not mine to replace")
    with pytest.raises(FileExistsError, match="not an adapter directory"):
        peftkit.save(old, tmp_path / "adapter")
    assert (tmp_path / "adapter").read_text() == "not mine to replace"


def test_saving_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    old, new = _old_and_new()
    peftkit.save(old, tmp_path / "ckpt1")
    (tmp_path / "latest").symlink_to("ckpt1")
    peftkit.save(new, tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink() and sorted(os.listdir(tmp_path)) == ["ckpt1", "latest"]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(_output_after_load(old, tmp_path / "ckpt1", x), new(x), rtol=0, atol=0)
