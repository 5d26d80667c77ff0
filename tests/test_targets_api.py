"""Target matching, attach/remove/activate bookkeeping, freezing and parameter accounting."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import peftkit
from peftkit import LoRA, TargetError
from peftkit.core.targets import match_targets, module_names, own_modules

from .conftest import randomize


def test_list_entries_match_exact_or_suffix(tiny) -> None:
    assert match_targets(tiny, ["q", "ffn.0"]) == ["attn.q", "ffn.0"]
    assert match_targets(tiny, ["attn.k"]) == ["attn.k"]


def test_regex_is_a_full_match(tiny) -> None:
    assert match_targets(tiny, r"attn\.(q|v)") == ["attn.q", "attn.v"]
    with pytest.raises(TargetError, match="matches no module"):
        match_targets(tiny, r"q")  # a full match, not a search


def test_all_linear_skips_the_lm_head() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16))
    names = match_targets(model, "all-linear")
    assert "lm_head" not in names
    assert set(names) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                          "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}


def test_unknown_target_lists_close_names(tiny) -> None:
    with pytest.raises(TargetError, match=r"'qq' matches no module; close module names: q"):
        peftkit.attach(tiny, LoRA(targets=["q", "qq"]))
    with pytest.raises(TargetError, match="invalid"):
        match_targets(tiny, "(")


def test_exclude_and_wrong_type(tiny) -> None:
    assert match_targets(tiny, "all-linear", exclude=["head", "ffn.0", "ffn.2"]) == ["attn.q", "attn.k", "attn.v"]
    with pytest.raises(TargetError, match="leave no module"):
        match_targets(tiny, ["q"], exclude=["q"])
    with pytest.raises(TargetError, match=r"ffn.1 \(GELU\)"):
        peftkit.attach(tiny, LoRA(targets=["ffn.1"]))


def test_failed_attach_leaves_model_untouched(tiny) -> None:
    state = copy.deepcopy(tiny.state_dict())
    with pytest.raises(TargetError):
        peftkit.attach(tiny, LoRA(targets=["q", "nope"]), "x")
    assert tiny.state_dict().keys() == state.keys()
    assert all(p.requires_grad for p in tiny.parameters())


def test_attach_freezes_base_and_counts_parameters(tiny) -> None:
    total_base = sum(p.numel() for p in tiny.parameters())
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "v"], modules_to_save=["head"]), "a")
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable == {"attn.q.peftkit.a.lora_A", "attn.q.peftkit.a.lora_B", "attn.v.peftkit.a.lora_A",
                         "attn.v.peftkit.a.lora_B", "head.peftkit.a.module.weight", "head.peftkit.a.module.bias"}
    s = peftkit.summary(tiny)
    lora = 2 * (2 * 16 + 16 * 2)
    assert s.per_adapter == {"a": lora + 16 * 3 + 3}
    assert s.total == total_base + lora + 16 * 3 + 3 and s.trainable == lora + 16 * 3 + 3
    assert "trainable" in str(s) and "a" in str(s)


def test_base_names_unchanged_so_base_checkpoints_load(tiny) -> None:
    base_state = copy.deepcopy(tiny.state_dict())
    peftkit.attach(tiny, LoRA(targets="all-linear", rank_pattern={"head": 2}))
    assert set(base_state) <= set(tiny.state_dict())
    missing, unexpected = tiny.load_state_dict(base_state, strict=False)
    assert unexpected == [] and all(".peftkit." in k for k in missing)


def test_multiple_named_adapters_activate_and_remove(tiny, ids) -> None:
    base = tiny(ids)
    peftkit.attach(tiny, LoRA(targets=["q"]), "a")
    peftkit.attach(tiny, LoRA(targets=["q", "v"]), "b", activate=False)
    randomize(tiny)
    assert peftkit.active_adapters(tiny) == ["a"] and list(peftkit.adapters(tiny)) == ["a", "b"]
    assert not torch.allclose(tiny(ids), base, atol=1e-4)  # adapter "a" acts
    peftkit.activate(tiny, "b")
    out_b = tiny(ids)
    h = tiny.embed(ids)
    q_outs = {}
    for active in (["a"], ["b"], ["a", "b"]):
        peftkit.activate(tiny, active)
        q_outs[len(active), active[0]] = tiny.attn.q(h)
    with peftkit.disabled(tiny):
        q_base = tiny.attn.q(h)
    torch.testing.assert_close(q_outs[2, "a"] - q_base, (q_outs[1, "a"] - q_base) + (q_outs[1, "b"] - q_base))
    peftkit.activate(tiny, "b")
    peftkit.remove(tiny, "a")
    assert peftkit.active_adapters(tiny) == ["b"]
    torch.testing.assert_close(tiny(ids), out_b)
    peftkit.remove(tiny, "b")
    torch.testing.assert_close(tiny(ids), base)
    assert not hasattr(tiny.attn.q, "peftkit") and not tiny.attn.q._forward_hooks


def test_name_and_duplicate_errors(tiny) -> None:
    peftkit.attach(tiny, LoRA(targets=["q"]), "a")
    with pytest.raises(ValueError, match="already attached"):
        peftkit.attach(tiny, LoRA(targets=["q"]), "a")
    for bad in ["x.y", "", "_registry", "forward", "training"]:
        with pytest.raises(ValueError, match="adapter name"):
            peftkit.attach(tiny, LoRA(targets=["q"]), bad)
    with pytest.raises(peftkit.UnknownAdapterError, match="'zz'"):
        peftkit.activate(tiny, "zz")
    with pytest.raises(ValueError, match="no peftkit adapters"):
        peftkit.summary(nn.Linear(2, 2))


def test_set_trainable_and_adapter_parameters(tiny, ids) -> None:
    peftkit.attach(tiny, LoRA(targets=["q"]), "a")
    peftkit.attach(tiny, LoRA(targets=["v"]), "b")
    peftkit.set_trainable(tiny, "a", False)
    assert not any(p.requires_grad for p in peftkit.adapter_parameters(tiny, "a"))
    assert all(p.requires_grad for p in peftkit.adapter_parameters(tiny, "b"))


def test_module_copy_trains_head_and_merges_exactly(tiny, ids) -> None:
    head_w = tiny.head.weight.detach().clone()
    peftkit.attach(tiny, LoRA(targets=["q"], modules_to_save=["head"]))
    opt = torch.optim.SGD(peftkit.adapter_parameters(tiny, "default"), lr=0.1)
    tiny(ids).sum().backward()
    opt.step()
    assert torch.equal(tiny.head.weight, head_w)  # the original head stays frozen
    assert not torch.equal(tiny.head.peftkit["default"].module.weight, head_w)
    trained = tiny(ids)
    peftkit.merge(tiny)
    torch.testing.assert_close(tiny(ids), trained, rtol=1e-5, atol=1e-5)
    peftkit.unmerge(tiny)
    assert torch.equal(tiny.head.weight, head_w)


def test_host_called_with_keyword_input(tiny) -> None:
    peftkit.attach(tiny, LoRA(targets=["q"]))
    randomize(tiny)
    x = torch.randn(2, 16)
    torch.testing.assert_close(tiny.attn.q(input=x), tiny.attn.q(x))
    peftkit.remove(tiny, "default")
    assert not tiny.attn.q._forward_hooks and not tiny.attn.q._forward_hooks_with_kwargs


def test_module_types_as_targets(tiny, tmp_path) -> None:
    assert match_targets(tiny, ["type:Linear"], exclude=["head"]) == ["attn.q", "attn.k", "attn.v", "ffn.0", "ffn.2"]
    assert match_targets(tiny, ["type:Module"], exclude=["type:Linear", "type:Sequential", "type:ModuleDict",
                                                         "type:GELU"]) == ["embed"]
    config = LoRA(targets=[nn.Embedding, "q"])  # classes become JSON-friendly names
    assert config.targets == ["type:Embedding", "q"]
    assert peftkit.config_from_dict(config.to_dict()) == config
    with pytest.raises(TargetError, match="'type:Conv2d' matches no module"):
        match_targets(tiny, ["type:Conv2d"])
    peftkit.attach(tiny, LoRA(targets=["type:Linear"], exclude=["head"]))
    peftkit.save(tiny, tmp_path / "peft", format="peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["attn.k", "attn.q", "attn.v", "ffn.0", "ffn.2"]


def test_load_hands_each_host_only_its_own_tensors(tmp_path, monkeypatch) -> None:
    """A head copy on `1` and a LoRA on its child `1.0`: loading gives the copy its `module.*` tensors, not the
    child's LoRA factors (which live under the deeper host)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 3)))
    peftkit.attach(model, LoRA(r=2, targets=["0", "1.0"], modules_to_save=["1"]))
    saved = peftkit.save(model, tmp_path / "a")
    received: dict[str, list[str]] = {}
    for cls in (peftkit.core.delta.ModuleCopy, type(model[0].peftkit["default"])):
        monkeypatch.setattr(cls, "prepare_load", lambda self, own, cls=cls: received.setdefault(cls.__name__, []).extend(own))
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 3)))
    peftkit.load(fresh, saved)
    assert received["ModuleCopy"] and all(key.startswith("module.") for key in received["ModuleCopy"])
    assert sorted(received["LoRADelta"]) == ["lora_A", "lora_A", "lora_B", "lora_B"]


def test_target_walk_sees_the_model_only_however_many_adapters_are_attached(tiny) -> None:
    """Choosing targets walks the model's own modules: attached deltas neither show up nor lengthen the walk (a
    server attaches adapters while dozens of others are loaded)."""
    names = module_names(tiny)
    walked = len(list(own_modules(tiny)))
    for i in range(5):
        peftkit.attach(tiny, LoRA(r=2, targets="all-linear"), name=f"a{i}", activate=False)
    assert module_names(tiny) == names
    assert len(list(own_modules(tiny))) == walked < len(list(tiny.named_modules()))
    assert [n for n, _ in own_modules(tiny)] == [n for n, _ in tiny.named_modules() if ".peftkit" not in f".{n}"]
