"""AdapterStore: registration without reads, background loads, LRU eviction by count and bytes, pinning, failures
kept to their adapter, path safety, and both file layouts giving the outputs of the adapter loaded alone."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit import IA3, LoRA
from peftkit.core.io import read_adapter
from peftkit.serve import AdapterUnavailable, ServeError, UnknownAdapter
from peftkit.serve.store import AdapterStore, PathRefused

from .checks import needs_peft
from .conftest import randomize
from .sequence_checks import VOCAB, tiny_bert, tiny_llama

IDS = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(1))
QV = ["q_proj", "v_proj"]


def _save(model: nn.Module, directory: Path, name: str, config=None) -> torch.Tensor:
    """Save a random adapter of `config` (LoRA r=2 on q, v) to `directory`; return the logits it gives alone."""
    peftkit.attach(model, config or LoRA(r=2, targets=QV), name)
    randomize(model, name)
    peftkit.save(model, directory, name)
    expected = model(IDS).logits
    peftkit.remove(model, name)
    return expected


def _settle(store: AdapterStore, wanted: set[str], in_use: set[str] = frozenset(), timeout: float = 10.0) -> None:
    """Call `prepare` as a serving loop would until no wanted (or pinned) adapter is loading."""
    watched = wanted | {n for n in store.names() if store.pinned(n)}
    deadline = time.monotonic() + timeout
    while True:
        store.prepare(wanted, in_use)
        if all(store.state(n) != "loading" for n in watched) or time.monotonic() > deadline:
            return
        store.wait_reads(watched, timeout=0.05)


@pytest.fixture
def llama() -> nn.Module:
    return tiny_llama()


@pytest.fixture
def saved(llama, tmp_path) -> dict[str, torch.Tensor]:
    """Adapters a, b, c, d (LoRA r=2: equal sizes) under tmp_path/root, with their solo logits."""
    return {name: _save(llama, tmp_path / "root" / name, name) for name in "abcd"}


def _store(llama, tmp_path, **kwargs) -> AdapterStore:
    store = AdapterStore(llama, tmp_path / "root", **kwargs)
    for name in os.listdir(tmp_path / "root"):
        store.register(name, name)
    return store


def _assert_outputs(llama, saved, names) -> None:
    rows = [names[i % len(names)] for i in range(IDS.shape[0])]
    with torch.no_grad(), peftkit.routed(llama, rows):
        mixed = llama(IDS).logits
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], saved[name][row], rtol=1e-5, atol=1e-5)


def test_loads_wanted_adapters_with_their_solo_outputs(llama, saved, tmp_path) -> None:
    store = _store(llama, tmp_path)
    assert store.state("a") == "unloaded" and peftkit.adapters(llama) == {}
    _settle(store, {"a", "b", "c"})
    assert {n: store.state(n) for n in "abcd"} == {"a": "ready", "b": "ready", "c": "ready", "d": "unloaded"}
    assert set(peftkit.adapters(llama)) == {"a", "b", "c"} and peftkit.active_adapters(llama) == []
    _assert_outputs(llama, saved, ["a", "b", "c"])
    nbytes = sum(t.numel() * t.element_size() for t in read_adapter(tmp_path / "root" / "a")[1].values())
    assert store.stats() == {"hits": 0, "misses": 3, "evictions": 0, "loaded": 3, "loaded_bytes": 3 * nbytes}


def test_lru_eviction_by_count(llama, saved, tmp_path) -> None:
    store = _store(llama, tmp_path, max_loaded=2)
    for wanted in ("a", "b", "a", "c"):  # a used again after b: b is the least recently used when c comes
        _settle(store, {wanted})
    assert set(peftkit.adapters(llama)) == {"a", "c"} and store.state("b") == "unloaded"
    assert store.stats() | {"loaded_bytes": 0} == {"hits": 1, "misses": 3, "evictions": 1, "loaded": 2, "loaded_bytes": 0}
    _settle(store, {"b"})  # back after eviction: a miss, and a (used before c) goes
    assert set(peftkit.adapters(llama)) == {"b", "c"}
    _assert_outputs(llama, saved, ["b", "c"])


def test_lru_eviction_by_bytes(llama, saved, tmp_path) -> None:
    _save(llama, tmp_path / "root" / "big", "big", LoRA(r=4, targets=QV))  # twice a's bytes
    one = sum(t.numel() * t.element_size() for t in read_adapter(tmp_path / "root" / "a")[1].values())
    store = _store(llama, tmp_path, max_bytes=3 * one)
    for wanted in ("a", "b", "c"):
        _settle(store, {wanted})
    assert store.stats()["loaded_bytes"] == 3 * one
    _settle(store, {"big"})  # needs 2 units: the two least recently used go
    assert set(peftkit.adapters(llama)) == {"c", "big"}
    assert store.stats()["evictions"] == 2 and store.stats()["loaded_bytes"] == 3 * one


def test_pinned_and_in_use_are_never_evicted(llama, saved, tmp_path) -> None:
    store = AdapterStore(llama, tmp_path / "root", max_loaded=2)
    store.register("p", "a", pin=True)
    for name in "bcd":
        store.register(name, name)
    _settle(store, set())  # pinned adapters load without being asked for
    assert store.state("p") == "ready" and store.pinned("p") and not store.pinned("b")
    _settle(store, {"b"}, in_use={"b"})
    store.prepare({"b", "c"}, {"b"})  # c's read may finish, but the only room is b's, and b is in use
    store.wait_reads({"c"}, timeout=10)
    store.prepare({"b", "c"}, {"b"})
    assert store.state("c") == "loading" and set(peftkit.adapters(llama)) == {"p", "b"}
    _settle(store, {"c"}, in_use={"c"})  # b's requests finished: b goes, never p
    assert set(peftkit.adapters(llama)) == {"p", "c"}
    _assert_outputs(llama, {"p": saved["a"], "c": saved["c"]}, ["p", "c"])


def test_adapter_that_can_never_fit_fails(llama, saved, tmp_path) -> None:
    def pinned_last(path: Path, model: nn.Module):  # b is attached first: the pinned adapter must still get in
        time.sleep(0.3 if path.name == "a" else 0)
        return read_adapter(path, model)

    store = AdapterStore(llama, tmp_path / "root", max_loaded=1, reader=pinned_last)
    store.register("p", "a", pin=True)
    store.register("b", "b")
    _settle(store, {"b"})
    assert store.state("p") == "ready" and set(peftkit.adapters(llama)) == {"p"}
    assert store.state("b") == "failed" and "beside the 1 pinned adapters" in store.failure("b")
    store = AdapterStore(tiny_llama(), tmp_path / "root", max_bytes=100)
    store.register("a", "a")
    _settle(store, {"a"})
    assert "do not fit the adapter limits" in store.failure("a") and "max_bytes=100" in store.failure("a")


def test_registering_a_thousand_reads_nothing(llama, saved, tmp_path) -> None:
    reads: list[Path] = []

    def counting(path: Path, model: nn.Module):
        reads.append(path)
        return read_adapter(path, model)

    store = AdapterStore(llama, tmp_path / "root", reader=counting)
    for i in range(1000):
        store.register(f"n{i}", "abcd"[i % 4])
    assert len(store.names()) == 1000 and "n999" in store and reads == []
    _settle(store, {"n6"})
    assert reads == [tmp_path.resolve() / "root" / "c"] and set(peftkit.adapters(llama)) == {"n6"}
    _assert_outputs(llama, {"n6": saved["c"]}, ["n6"])


def test_prepare_never_waits_for_a_read(llama, saved, tmp_path) -> None:
    release = threading.Event()

    def slow(path: Path, model: nn.Module):
        assert release.wait(10)
        return read_adapter(path, model)

    store = AdapterStore(llama, tmp_path / "root", reader=slow)
    store.register("a", "a")
    started = time.monotonic()
    store.prepare({"a"}, set())
    store.prepare({"a"}, set())
    assert time.monotonic() - started < 1 and store.state("a") == "loading"
    with torch.no_grad():  # the model keeps serving meanwhile
        llama(IDS)
    release.set()
    _settle(store, {"a"})
    assert store.state("a") == "ready"


def test_a_corrupt_adapter_fails_alone(llama, saved, tmp_path) -> None:
    (tmp_path / "root" / "b" / "adapter.safetensors").write_bytes(b"not a safetensors file")
    _save(tiny_bert(), tmp_path / "root" / "alien", "alien", LoRA(r=2, targets=["query"]))  # other model's modules
    store = _store(llama, tmp_path)
    _settle(store, {"a", "b", "c", "alien"})
    assert {n: store.state(n) for n in ("a", "b", "c", "alien")} == {
        "a": "ready", "b": "failed", "c": "ready", "alien": "failed"}
    assert "not a readable safetensors file" in store.failure("b") and store.failure("a") is None
    assert "'alien' failed to load" in store.failure("alien") and "query" in store.failure("alien")
    with pytest.raises(AdapterUnavailable, match="not a readable safetensors") as err:
        store.check("b")
    assert err.value.status == 500
    store.check("a")
    store.check(None)
    assert set(peftkit.adapters(llama)) == {"a", "c"}
    _assert_outputs(llama, saved, ["a", "c"])


def test_unknown_names_and_taken_names(llama, saved, tmp_path) -> None:
    store = _store(llama, tmp_path)
    for call in (store.check, store.state, store.failure, store.pinned, store.unregister):
        with pytest.raises(UnknownAdapter, match="no adapter named 'zz'") as err:
            call("zz")
        assert err.value.status == 404
    with pytest.raises(ServeError, match="already registered"):
        store.register("a", "b")
    with pytest.raises(ServeError, match="adapter name 'no good' is invalid"):
        store.register("no good", "a")


def test_unregister_refused_in_use_then_removes(llama, saved, tmp_path) -> None:
    store = _store(llama, tmp_path)
    _settle(store, {"a", "b"}, in_use={"a"})
    with pytest.raises(ServeError, match="in use") as err:
        store.unregister("a")
    assert err.value.status == 400
    _settle(store, {"b"})
    store.unregister("a")
    assert "a" not in store and "a" in peftkit.adapters(llama)  # the serving thread removes it
    store.prepare(set(), set())
    assert set(peftkit.adapters(llama)) == {"b"}
    store.register("a", "c")  # the name is free again, for another directory
    _settle(store, {"a"})
    _assert_outputs(llama, {"a": saved["c"], "b": saved["b"]}, ["a", "b"])


def test_paths_outside_the_root_are_refused(llama, saved, tmp_path) -> None:
    outside = tmp_path / "outside"
    _save(llama, outside, "o")
    root = tmp_path / "root"
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "file-link").mkdir()
    (root / "file-link" / "peftkit_adapter.json").write_bytes((root / "a" / "peftkit_adapter.json").read_bytes())
    (root / "file-link" / "adapter.safetensors").symlink_to(outside / "adapter.safetensors")
    store = AdapterStore(llama, root)
    for i, path in enumerate(["../outside", str(outside), "link", "a/../../outside", "file-link"]):
        with pytest.raises(PathRefused, match="outside the adapter root") as err:
            store.register(f"x{i}", path)
        assert err.value.status == 403 and isinstance(err.value, ServeError)
    store.register("inside", "b/../a")  # resolves inside the root
    store.register("absolute", str(root / "c"))
    _settle(store, {"inside", "absolute"})
    _assert_outputs(llama, {"inside": saved["a"], "absolute": saved["c"]}, ["inside", "absolute"])


def test_a_path_swapped_for_a_symlink_out_fails_its_load(llama, saved, tmp_path) -> None:
    outside = tmp_path / "outside"
    _save(llama, outside, "o")
    store = _store(llama, tmp_path)
    weights = tmp_path / "root" / "a" / "adapter.safetensors"
    weights.unlink()
    weights.symlink_to(outside / "adapter.safetensors")
    _settle(store, {"a"})
    assert store.state("a") == "failed" and "outside the adapter root" in store.failure("a")


def test_only_safetensors_directories_register(llama, saved, tmp_path) -> None:
    root = tmp_path / "root"
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    (root / "empty").mkdir()
    store = AdapterStore(llama, root)
    with pytest.raises(ServeError, match="adapter_model.bin, a pickle, which is never loaded"):
        store.register("p", "pickled")
    with pytest.raises(ServeError, match="holds no adapter"):
        store.register("e", "empty")
    with pytest.raises(ServeError, match="not a directory"):
        store.register("m", "missing")


def test_other_methods_load_and_route(llama, tmp_path) -> None:
    saved = {"lora": _save(llama, tmp_path / "root" / "lora", "lora"),
             "ia3": _save(llama, tmp_path / "root" / "ia3", "ia3", IA3(targets=["k_proj", "down_proj"],
                                                                        feedforward=["down_proj"]))}
    store = _store(llama, tmp_path)
    _settle(store, {"lora", "ia3"})
    _assert_outputs(llama, saved, ["lora", "ia3"])


@needs_peft
def test_peft_format_directory_gives_peft_outputs(llama, tmp_path) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(llama), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(tmp_path / "root" / "hf")
    expected = peft_model(IDS).logits
    _save(llama, tmp_path / "root" / "ours", "ours")
    store = _store(llama, tmp_path)
    _settle(store, {"hf", "ours"})
    assert store.state("hf") == "ready"
    with torch.no_grad(), peftkit.routed(llama, ["hf", "ours", "hf", None]):
        mixed = llama(IDS).logits
    torch.testing.assert_close(mixed[[0, 2]], expected[[0, 2]], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[1], expected[1], atol=1e-3)


def test_virtual_tokens_from_the_config_and_a_corrupt_config_refused(llama, saved, tmp_path) -> None:
    """The prompt length an adapter adds is read from its config before loading; a config that is not JSON makes
    the request's adapter unavailable, with the file named."""
    store = _store(llama, tmp_path)
    assert store.virtual_tokens("a") == 0  # LoRA
    (tmp_path / "root" / "b" / "peftkit_adapter.json").write_text("{not json")
    with pytest.raises(AdapterUnavailable, match="peftkit_adapter.json is not valid JSON"):
        store.virtual_tokens("b")
    store.close()
