"""OFT: the blockwise input rotation by hand (float64; exact Cayley and PEFT's Neumann series), zero init, merge
and unmerge (exact even for a non-orthogonal R), input transforms in active order and per row under routing,
named errors, and Hugging Face PEFT files both ways with equal outputs."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import IA3, OFT, LoRA, TargetError

from .checks import assert_merge_roundtrip, assert_routed_grads_match_rows, assert_routed_matches_rows, needs_peft
from .conftest import randomize
from .peft_checks import assert_peft_loads_in_peftkit, assert_peftkit_loads_in_peft, bert_inputs, tiny_bert


def _rotations(vec: torch.Tensor, k: int, neumann_terms: int | None) -> torch.Tensor:
    """R per stored block, float64, written out: Q skew from its upper triangle (row-major), then Cayley."""
    vec = vec.detach().double()
    q = torch.zeros(vec.shape[0], k, k, dtype=torch.float64)
    i, j = torch.triu_indices(k, k, 1)
    q[:, i, j] = vec
    q = q - q.transpose(1, 2)
    eye = torch.eye(k, dtype=torch.float64)
    if neumann_terms is None:
        return (eye - q) @ torch.linalg.inv(eye + q)
    assert neumann_terms == 5
    return eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q


def _rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x with block i of its features multiplied by R_i from the right (r: [blocks or 1, k, k])."""
    k = r.shape[-1]
    blocks = x.double().reshape(*x.shape[:-1], -1, k)
    return torch.cat([blocks[..., i, :] @ r[i % r.shape[0]] for i in range(blocks.shape[-2])], dim=-1)


@pytest.mark.parametrize("host", ["linear", "conv1d"])
@pytest.mark.parametrize(("fields", "stored"), [
    ({"oft_block_size": 4}, 3),  # Neumann series (PEFT's default), 12 = 3 blocks of 4
    ({"oft_block_size": 4, "use_cayley_neumann": False}, 3),  # exact Cayley
    ({"r": 2}, 2),  # 2 blocks of 6
    ({"oft_block_size": 3, "block_share": True}, 1),  # one rotation for all 4 blocks
])
def test_forward_matches_formula(host: str, fields: dict, stored: int) -> None:
    model = nn.Sequential(nn.Linear(12, 5) if host == "linear" else Conv1D(5, 12))
    w0 = model[0].weight.detach().double()
    w0 = w0 if host == "linear" else w0.T  # [out, in]
    peftkit.attach(model, OFT(targets=["0"], **fields))
    randomize(model)
    vec = model[0].peftkit["default"].oft_R
    k = 12 // fields["r"] if "r" in fields else fields["oft_block_size"]
    assert vec.shape == (stored, k * (k - 1) // 2)
    r = _rotations(vec, k, None if fields.get("use_cayley_neumann") is False else 5)
    x = torch.randn(3, 2, 12)
    expected = _rotate(x, r) @ w0.T + model[0].bias.double()
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(x).double(), x.double() @ w0.T + model[0].bias.double(), atol=1e-2)


def test_exact_cayley_is_orthogonal_and_neumann_only_nearly() -> None:
    model = nn.Sequential(nn.Linear(8, 3))
    peftkit.attach(model, OFT(oft_block_size=4, use_cayley_neumann=False, targets=["0"]), "exact")
    peftkit.attach(model, OFT(oft_block_size=4, targets=["0"]), "neumann")
    randomize(model)
    for name, orthogonal in (("exact", True), ("neumann", False)):
        r = model[0].peftkit[name].rotation_matrix().double()
        assert torch.allclose(r @ r.T, torch.eye(8, dtype=torch.float64), atol=1e-5) is orthogonal


def test_fresh_adapter_is_exact_noop(tiny, ids) -> None:
    before = tiny(ids)
    peftkit.attach(tiny, OFT(oft_block_size=4, targets="all-linear"))
    assert torch.equal(tiny(ids), before)


@pytest.mark.parametrize("neumann", [True, False])
def test_merge_unmerge_roundtrip(tiny, ids, neumann: bool) -> None:
    """Unmerge solves with R, so the base comes back to 1e-6 even when R (Neumann) is far from orthogonal."""
    peftkit.attach(tiny, OFT(oft_block_size=4, use_cayley_neumann=neumann, targets="all-linear"))
    randomize(tiny, scale=0.5)
    assert_merge_roundtrip(tiny, ids, "attn.q.weight")


def test_merge_with_lora_on_the_same_hosts(tiny, ids) -> None:
    """The rotation acts on the input, a LoRA beside it reads the unrotated input: both merged, same outputs."""
    peftkit.attach(tiny, OFT(oft_block_size=4, targets=["q", "ffn.0"]), "oft")
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "ffn.0"]), "lora")
    randomize(tiny)
    peftkit.activate(tiny, ["oft", "lora"])
    assert_merge_roundtrip(tiny, ids, "attn.q.weight")


def _single(*configs: tuple[str, peftkit.AdapterConfig]) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(12, 5))
    for name, config in configs:
        peftkit.attach(model, config, name)
    randomize(model)
    return model


def test_active_input_transforms_apply_in_active_order() -> None:
    model = _single(("a", OFT(oft_block_size=4, targets=["0"])), ("b", OFT(oft_block_size=6, targets=["0"])),
                    ("ia3", IA3(targets=["0"], feedforward=["0"])))
    slot = model[0].peftkit
    x = torch.randn(4, 12)
    with torch.no_grad():
        rot = {n: slot[n].transform_input for n in ("a", "b")}
        scale = slot["ia3"].ia3_l.flatten()
        for order, t in ((["a", "b"], lambda x: rot["b"](rot["a"](x))), (["b", "a"], lambda x: rot["a"](rot["b"](x))),
                         (["ia3", "a"], lambda x: rot["a"](x * scale)), (["a", "ia3"], lambda x: rot["a"](x) * scale)):
            peftkit.activate(model, order)
            torch.testing.assert_close(model(x), F.linear(t(x), model[0].weight, model[0].bias))
        assert not torch.allclose(rot["b"](rot["a"](x)), rot["a"](rot["b"](x)), atol=1e-3)  # order really matters


@pytest.mark.parametrize("rows", [["a", None, "lora", "b", "ia3", "a"], ["a", "a", "b", "lora", "ia3", None]])
def test_mixed_batch_with_lora_ia3_and_base_equals_rows_alone(tiny, ids, rows) -> None:
    peftkit.attach(tiny, OFT(oft_block_size=4, targets=["q", "v", "ffn.0", "ffn.2"]), "a")
    peftkit.attach(tiny, OFT(r=2, use_cayley_neumann=False, block_share=True, targets=["q", "ffn.2"]), "b")
    peftkit.attach(tiny, LoRA(r=2, targets=["q", "k", "ffn.2"]), "lora")
    peftkit.attach(tiny, IA3(targets=["q", "ffn.2"], feedforward=["ffn.2"]), "ia3")
    randomize(tiny)
    assert_routed_matches_rows(tiny, ids, rows)
    grads = assert_routed_grads_match_rows(tiny, ids, rows)
    assert any(".peftkit.b." in n for n in grads) and any(".peftkit.a." in n for n in grads)


def test_module_dropout_sets_blocks_to_identity_in_training_only() -> None:
    model = _single(("default", OFT(oft_block_size=3, module_dropout=0.5, targets=["0"])))
    delta = model[0].peftkit["default"]
    x = torch.randn(4, 12)
    with torch.no_grad():
        r = delta.rotations().double()
        torch.testing.assert_close(model.eval()(x).double(), _rotate(x, r) @ model[0].weight.double().T
                                   + model[0].bias.double(), rtol=1e-5, atol=1e-5)
        torch.manual_seed(3)
        dropped = torch.randperm(4)[:2]  # ⌊0.5 · 4⌋ blocks become I (PEFT's MultiplicativeDropoutLayer)
        r[dropped] = torch.eye(3, dtype=torch.float64)
        torch.manual_seed(3)
        torch.testing.assert_close(model.train()(x).double(), _rotate(x, r) @ model[0].weight.double().T
                                   + model[0].bias.double(), rtol=1e-5, atol=1e-5)


def test_coft_keeps_each_rotation_within_eps() -> None:
    model = _single(("default", OFT(oft_block_size=4, coft=True, eps=0.1, targets=["0"])))
    delta = model[0].peftkit["default"]
    model(torch.randn(2, 12))
    q = delta._skew(delta.oft_R.detach())
    norms = torch.linalg.matrix_norm(q)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.1 / 3 ** 0.5))  # projected onto the ball's surface


def test_invalid_sizes_and_hosts_are_named_errors() -> None:
    with pytest.raises(ValueError, match=r"oft cannot adapt module '0'.*oft_block_size=5 does not divide .* 12 input"):
        peftkit.attach(nn.Sequential(nn.Linear(12, 5)), OFT(oft_block_size=5, targets=["0"]))
    with pytest.raises(ValueError, match=r"oft cannot adapt module '0'.*r=24 blocks do not divide .* 12 input"):
        peftkit.attach(nn.Sequential(nn.Linear(12, 5)), OFT(r=24, oft_block_size=0, targets=["0"]))
    for sizes in ({"r": 2, "oft_block_size": 6}, {"oft_block_size": 0}):
        with pytest.raises(ValueError, match="set exactly one of r"):
            OFT(targets=["0"], **sizes)
    assert OFT(r=2, targets=["0"]).oft_block_size == 0  # r alone: the default block size steps aside
    with pytest.raises(ValueError, match="num_cayley_neumann_terms"):
        OFT(num_cayley_neumann_terms=0, targets=["0"])
    with pytest.raises(TargetError, match=r"0 \(Conv2d\)"):
        peftkit.attach(nn.Sequential(nn.Conv2d(4, 4, 3)), OFT(oft_block_size=4, targets=["0"]))


def test_conv1d_host_refuses_peft_format(tmp_path: Path) -> None:
    model = nn.Sequential(Conv1D(5, 12))
    peftkit.attach(model, OFT(oft_block_size=4, targets=["0"]))
    with pytest.raises(ValueError, match="PEFT's OFT has no layer for GPT-2's Conv1D"):
        peftkit.save(model, tmp_path, format="peft")


def test_own_format_round_trip_is_exact(tiny, ids, tmp_path: Path) -> None:
    fresh = copy.deepcopy(tiny)
    config = OFT(oft_block_size=4, block_share=True, targets=["q", "ffn.0"])
    peftkit.attach(tiny, config, "mine")
    randomize(tiny)
    peftkit.save(tiny, tmp_path, "mine")
    assert peftkit.load(fresh, tmp_path) == "mine" and peftkit.adapters(fresh) == {"mine": config}
    assert torch.equal(fresh(ids), tiny(ids))


# --- Hugging Face PEFT interop ---------------------------------------------------------------------------------

TARGETS = ["query", "value", "intermediate.dense", "output.dense"]
PEFT_CASES = {
    "neumann": {"oft_block_size": 8},
    "exact-cayley": {"oft_block_size": 8, "use_cayley_neumann": False},
    "block-share": {"oft_block_size": 4, "block_share": True},
    "r-blocks": {"r": 4, "oft_block_size": 0},
    "neumann-3-terms": {"oft_block_size": 8, "num_cayley_neumann_terms": 3},
    "coft": {"oft_block_size": 8, "coft": True, "eps": 0.5},
}


@needs_peft
@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_adapter_loads_with_same_outputs(case: str, tmp_path: Path) -> None:
    import peft
    config = peft.OFTConfig(target_modules=TARGETS, **PEFT_CASES[case])
    fresh = assert_peft_loads_in_peftkit(tiny_bert, bert_inputs(), config, "oft_R", tmp_path, OFT)
    assert peftkit.adapters(fresh)["default"].model_dump(include=set(PEFT_CASES[case])) == PEFT_CASES[case]


@needs_peft
@pytest.mark.parametrize("case", PEFT_CASES)
def test_our_adapter_loads_in_peft_with_same_outputs(case: str, tmp_path: Path) -> None:
    saved = assert_peftkit_loads_in_peft(tiny_bert, bert_inputs(), OFT(targets=TARGETS, **PEFT_CASES[case]), tmp_path,
                                         lambda model: randomize(model, scale=0.1))
    assert saved["peft_type"] == "OFT" and all(saved[k] == v for k, v in PEFT_CASES[case].items())


@needs_peft
@pytest.mark.parametrize(("edit", "message"), [
    ({"bias": "all"}, "OFT option bias='all' is not supported"),
    ({"peft_version": "0.17.0"}, "use_cayley_neumann=True from PEFT 0.17.0 is not supported"),
])
def test_unsupported_peft_file_is_a_named_error(edit: dict, message: str, tmp_path: Path) -> None:
    import peft
    peft.get_peft_model(tiny_bert(), peft.OFTConfig(oft_block_size=8, target_modules=["query"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(peftkit.AdapterFileError, match=message):
        peftkit.load(tiny_bert(), tmp_path)
