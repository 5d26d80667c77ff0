"""Hybrid adapters (Compose, UniPELT, MAM, layer groups): the composition's formula, the gates' start, per-row
routing beside other adapters, exact save / load, merging where the math allows, named errors, `peftkit train`.
Learning on BBC News: test_hybrid_learning.py."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import peftkit
from peftkit.core.config import config_from_dict
from peftkit.core.io import adapter_tensors, fill_adapter, read_adapter
from peftkit.core.merging import MergeError
from peftkit.core.registry import adapter_deltas
from peftkit.core.slot import delta_of
from peftkit.methods import MAM, Bottleneck, Compose, LayerGroups, LoRA, PrefixTuning, PromptTuning, UniPELT
from peftkit.methods.hybrid import group_sizes
from peftkit.train import config_from_mapping, load_config, run_training

from .sequence_checks import VOCAB, assert_routed_grads, assert_routed_rows, logits, tiny_bert, tiny_llama
from .train_models import tiny_config

FFN_OUT = r".*layer\.\d+\.output\.dense"


def randomize(model: nn.Module, name: str, std: float = 0.3, seed: int = 0) -> None:
    """Every parameter of adapter `name` (gates included) random: a fresh adapter's zeros would hide mistakes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peftkit.adapter_parameters(model, name):
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def ids(rows: int = 4, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_compose_is_the_sum_of_its_parts_run_as_separate_adapters() -> None:
    """Compose(LoRA on q/v, a parallel adapter and a LoRA both on the FFN output) gives the outputs of the three
    attached as their own adapters and active together; on a shared module: s·BAx + s_a·W_up relu(W_down x) + s'·B'A'x."""
    model = tiny_bert()
    parts = [LoRA(r=2, targets=["query", "value"]), Bottleneck(bottleneck=4, placement="parallel", scale=4.0, targets=FFN_OUT),
             LoRA(r=3, alpha=6.0, targets=FFN_OUT)]
    peftkit.attach(model, Compose(*parts), name="both")
    randomize(model, "both")
    names = [f"part{i}" for i in range(len(parts))]
    for name, part in zip(names, parts):
        peftkit.attach(model, part, name=name)
    for _, host, delta in adapter_deltas(model, "both"):
        for i, part in delta.parts.items():
            delta_of(host, names[int(i)]).load_state_dict(part.state_dict())
    x = ids()
    peftkit.activate(model, "both")
    composed = logits(model, x)
    peftkit.activate(model, names)
    torch.testing.assert_close(composed, logits(model, x), rtol=1e-5, atol=1e-6)

    delta = delta_of(model.get_submodule("bert.encoder.layer.0.output.dense"), "both")
    h = torch.randn(5, 32)
    adapter, lora = delta.parts["1"], delta.parts["2"]
    expected = 4.0 * adapter.up(F.relu(adapter.down(h))) + 2.0 * h @ lora.lora_A.T @ lora.lora_B.T
    torch.testing.assert_close(delta.increment(h), expected)


def test_gates_start_at_one_half() -> None:
    """A fresh UniPELT's gates are all σ(0) = 1/2: it equals the ungated UniPELT with LoRA's B, the adapter's W_up
    (and bias) and the prefix halved. A trained gate scales a part by σ(wᵀx + b) per position."""
    base = tiny_bert()
    gated, plain = base, copy.deepcopy(base)
    peftkit.attach(gated, UniPELT(r=2, bottleneck=4, num_virtual_tokens=3), name="u")
    peftkit.attach(plain, UniPELT(r=2, bottleneck=4, num_virtual_tokens=3, gates="none"), name="u")
    randomize(gated, "u")
    tensors = adapter_tensors(gated, "u")
    gate_keys = [key for key in tensors if ".gates." in key]
    assert gate_keys and all(key.endswith((".weight", ".bias")) for key in gate_keys)
    with torch.no_grad():
        for key in gate_keys:  # back to the gates' start
            tensors[key].zero_()
    halved = {key: value * 0.5 if key.endswith(("lora_B", "up.weight", "up.bias", "prompt_embeddings")) else value
              for key, value in tensors.items() if ".gates." not in key}
    fill_adapter(gated, "u", tensors, "test", strict=True)
    fill_adapter(plain, "u", halved, "test", strict=True)
    x = ids()
    torch.testing.assert_close(logits(gated, x), logits(plain, x), rtol=1e-5, atol=1e-6)

    randomize(gated, "u", seed=1)
    delta = delta_of(gated.get_submodule("bert.encoder.layer.1.attention.self.query"), "u")
    lora, gate = delta.parts["0"], delta.gates["0"]
    h = torch.randn(2, 5, 16)
    g = torch.sigmoid(h @ gate.weight.T + gate.bias)  # [2, 5, 1]: one gate per position
    torch.testing.assert_close(delta.increment(h), g * (h @ lora.lora_A.T @ lora.lora_B.T) * lora.scaling)


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_unipelt_mam_and_lora_route_in_one_batch_row_for_row(build) -> None:
    """A UniPELT (its gates trained), a MAM, a plain LoRA and bare-base rows in one routed batch: each row equals that
    row run alone, and the gradients equal the sum of the rows' own."""
    model = build()
    adapters = {"uni": UniPELT(r=2, bottleneck=4, num_virtual_tokens=3), "mam": MAM(num_virtual_tokens=5, bottleneck=4),
                "lora": LoRA(r=2, targets=r".*\.(query|value|q_proj|v_proj)")}
    for seed, (name, config) in enumerate(adapters.items()):
        peftkit.attach(model, config, name=name)
        randomize(model, name, seed=seed)
    rows = ["uni", "mam", None, "lora", "uni", "mam"]
    x = ids(len(rows))
    assert_routed_rows(model, x, rows)
    assert_routed_grads(model, x, rows)


@pytest.mark.parametrize("gates", ["none", "learned"])
def test_compose_of_prompt_ia3_and_lora_routes_row_for_row(gates: str) -> None:
    """Other kinds of parts: (IA)³ on the value output and the FFN input, LoRA beside (IA)³ on the value (an output
    rewrite and an increment on one module), and ungated a prompt (a gate scales prefixes only); routed beside a plain
    LoRA and base rows."""
    model = tiny_bert()
    ia3 = config_from_dict({"method": "ia3", "targets": ["value", "output.dense"], "feedforward": ["output.dense"]})
    prompt = [PromptTuning(num_virtual_tokens=3)] if gates == "none" else []
    peftkit.attach(model, Compose(*prompt, ia3, LoRA(r=2, targets=["query", "value"]), gates=gates), name="mix")
    peftkit.attach(model, LoRA(r=2, targets=["value"]), name="lora")
    randomize(model, "mix")
    randomize(model, "lora", seed=1)
    rows = ["mix", None, "lora", "mix"]
    assert_routed_rows(model, ids(len(rows)), rows)
    assert_routed_grads(model, ids(len(rows)), rows)


def test_prefix_gate_reads_only_a_rows_real_tokens() -> None:
    """Padding a row does not change its gated prefix (the gate's mean embedding skips pads): routed beside a longer
    row, a padded UniPELT row equals the row alone."""
    model = tiny_bert()
    peftkit.attach(model, UniPELT(r=2, bottleneck=4, num_virtual_tokens=3), name="uni")
    randomize(model, "uni")
    peftkit.attach(model, MAM(num_virtual_tokens=5, bottleneck=4), name="mam")
    randomize(model, "mam", seed=1)
    x = ids(2, 9)
    mask = torch.ones_like(x)
    mask[0, 6:] = 0
    with peftkit.routed(model, ["uni", "mam"]):
        mixed = model(input_ids=x, attention_mask=mask).logits
    peftkit.activate(model, "uni")
    torch.testing.assert_close(mixed[0], logits(model, x[:1, :6])[0], rtol=1e-5, atol=1e-5)


def _designs() -> dict[str, peftkit.AdapterConfig]:
    return {
        "compose": Compose(LoRA(r=2, targets=["query"]), PrefixTuning(num_virtual_tokens=4, projection=True),
                           Bottleneck(bottleneck=4, targets=FFN_OUT), gates="learned"),
        "unipelt": UniPELT(r=2, bottleneck=4, num_virtual_tokens=3),
        "mam": MAM(num_virtual_tokens=5, bottleneck=4),
        "layer_groups": LayerGroups(groups=[[LoRA(r=1, targets=["query"])],
                                            [LoRA(r=4, targets=["query", "value"]), Bottleneck.preset("parallel", bottleneck=4)]],
                                    shared=[PrefixTuning(num_virtual_tokens=2)], shape="uniform"),
    }


@pytest.mark.parametrize("method", list(_designs()))
def test_save_and_load_give_the_same_adapter_exactly(method: str, tmp_path) -> None:
    base = tiny_bert()
    model, fresh = copy.deepcopy(base), copy.deepcopy(base)
    config = _designs()[method]
    peftkit.attach(model, config, name="h")
    randomize(model, "h")
    x = ids()
    expected = logits(model, x)
    peftkit.save(model, tmp_path / "h", name="h")
    assert peftkit.load(fresh, tmp_path / "h") == "h"
    assert torch.equal(logits(fresh, x), expected)
    assert peftkit.adapters(fresh)["h"] == config.saved_config()
    assert config_from_dict(config.to_dict()) == config


def test_lora_parts_merge_and_unmerge() -> None:
    """Two LoRA parts (one module carries both) fold into the weights: the merged forward equals the unmerged one,
    and unmerging gives back the base weights."""
    model = tiny_bert()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peftkit.attach(model, Compose(LoRA(r=2, targets=["query"]), LoRA(r=3, targets=["query", "value"])), name="c")
    randomize(model, "c")
    x = ids()
    unmerged = logits(model, x)
    peftkit.merge(model, "c")
    torch.testing.assert_close(logits(model, x), unmerged, rtol=1e-5, atol=1e-5)
    peftkit.unmerge(model, "c")
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_a_compose_of_parts_that_add_terms_merges_beside_other_adapters() -> None:
    """BitFit and LoRA on one module each add a term reading only x, so their holder commutes with another LoRA
    there: either may be merged while the other runs unmerged, the outputs unchanged, and unmerging is exact."""
    model = tiny_bert()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peftkit.attach(model, Compose(peftkit.BitFit(targets=["query"]), LoRA(r=2, targets=["query"])), name="c")
    peftkit.attach(model, LoRA(r=3, targets=["query"]), name="l")
    randomize(model, "c")
    randomize(model, "l", seed=1)
    peftkit.activate(model, ["c", "l"])
    x = ids()
    unmerged = logits(model, x)
    for name in ("l", "c"):
        peftkit.merge(model, name)
        torch.testing.assert_close(logits(model, x), unmerged, rtol=1e-5, atol=1e-5)
        peftkit.unmerge(model, name)
        for n, p in model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_a_learned_gate_is_refused_on_a_host_without_features_on_its_last_axis() -> None:
    """A gate reads the last axis as features: a Conv2d's is the image width, an Embedding's input token ids."""
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(ValueError, match=r"module '0': part 0 \(lora\): a learned gate .* this Conv2d \(conv2d host\)"):
        peftkit.attach(conv, Compose(LoRA(r=2, targets=["0"]), gates="learned"))
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"'bert.embeddings.word_embeddings': part 0 \(lora\): .* this Embedding"):
        peftkit.attach(model, Compose(LoRA(r=2, targets=["word_embeddings"]), gates="learned"))
    assert peftkit.adapters(conv) == peftkit.adapters(model) == {}
    peftkit.attach(conv, Compose(LoRA(r=2, targets=["0"])))  # ungated: a Conv2d part is fine


@pytest.mark.parametrize("config, reason", [
    (Compose(LoRA(r=2, targets=["query"]), Bottleneck(bottleneck=4, targets=FFN_OUT)),
     r"part 1 \(bottleneck\): BottleneckDelta has no weight delta"),
    (Compose(LoRA(r=2, targets=["query"]), gates="learned"), r"part 0 \(lora\) is scaled by a learned gate"),
    (MAM(num_virtual_tokens=2, bottleneck=4), r"part 0 \(prefix_tuning\): virtual tokens are extra inputs"),
    (Compose(LoRA(r=2, targets=FFN_OUT), Bottleneck(bottleneck=4, targets=FFN_OUT)), r"part 1 \(bottleneck\)"),
], ids=["bottleneck", "gate", "prefix", "shared-module"])
def test_a_part_that_cannot_merge_refuses_the_whole_merge_by_name(config, reason) -> None:
    model = tiny_bert()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peftkit.attach(model, config, name="c")
    with pytest.raises(MergeError, match=reason):
        peftkit.merge(model, "c")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)


def test_bad_hybrids_are_named_errors() -> None:
    with pytest.raises(ValueError, match="parts\n  Field required"):
        Compose()
    with pytest.raises(ValueError, match="at least one part"):
        Compose(parts=[])
    with pytest.raises(ValueError, match=r"parts\[0\] \(unipelt\) is itself a hybrid"):
        Compose(UniPELT())
    with pytest.raises(ValueError, match=r"modules_to_save \['classifier'\]; give them to the hybrid"):
        Compose(LoRA(targets=["query"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="own training steps"):
        Compose(config_from_dict({"method": "adalora", "targets": ["query"], "total_step": 10}))
    with pytest.raises(ValueError, match=r"unknown PEFT method 'lorra' \(did you mean lora"):
        config_from_dict({"method": "compose", "parts": [{"method": "lorra", "targets": ["query"]}]})
    model = tiny_bert()
    with pytest.raises(ValueError, match="at most one prefix or prompt part"):
        peftkit.attach(model, Compose(PrefixTuning(num_virtual_tokens=2), PrefixTuning(num_virtual_tokens=3)))
    with pytest.raises(ValueError, match=r"part 0 \(prefix_tuning\) adds virtual tokens to every layer"):
        peftkit.attach(model, LayerGroups(groups=[[PrefixTuning(num_virtual_tokens=2)], []]))
    with pytest.raises(ValueError, match=r"part 0 \(lora\) targets \['classifier'\], which sit in no numbered layer"):
        peftkit.attach(model, LayerGroups(groups=[[LoRA(targets=["classifier"])], []]))
    with pytest.raises(ValueError, match="sizes"):
        LayerGroups(groups=[[LoRA(targets=["query"])]], sizes=[1, 1])
    with pytest.raises(ValueError, match=r"part 0 \(prompt_tuning\): a learned gate scales prefix keys and values"):
        peftkit.attach(model, Compose(PromptTuning(num_virtual_tokens=2), gates="learned"))
    ia3 = config_from_dict({"method": "ia3", "targets": FFN_OUT, "feedforward": FFN_OUT})
    with pytest.raises(ValueError, match=r"part 0 \(ia3\), part 1 \(lora\) sit on one module, some transforming its input"):
        peftkit.attach(model, Compose(ia3, LoRA(r=2, targets=FFN_OUT)))
    assert peftkit.adapters(model) == {}  # nothing half-attached


def test_mam_is_ungated_unless_gates_are_asked_for() -> None:
    model = tiny_bert()
    peftkit.attach(model, MAM(num_virtual_tokens=2, bottleneck=4), name="plain")
    peftkit.attach(model, MAM(num_virtual_tokens=2, bottleneck=4, gates="learned"), name="gated")
    gates = {name: [key for key in adapter_tensors(model, name) if ".gates." in key] for name in ("plain", "gated")}
    assert gates["plain"] == [] and ".gates.0.weight" in gates["gated"]  # the prefix's gate, on the model
    assert "bert.encoder.layer.0.output.dense.gates.1.weight" in gates["gated"]  # the parallel adapter's


def test_layer_group_sizes_and_placement() -> None:
    assert group_sizes("spindle", 4, 6) == [1, 2, 2, 1]
    assert group_sizes("spindle", 4, 12) == [2, 4, 4, 2]
    assert group_sizes("increasing", 4, 10) == [1, 2, 3, 4]
    assert group_sizes("decreasing", 4, 10) == [4, 3, 2, 1]
    assert group_sizes("bottleneck", 4, 6) == [2, 1, 1, 2]
    assert group_sizes("spindle", 5, 18) == [2, 4, 6, 4, 2]  # w = 1, 2, 3, 2, 1: rising to the middle, as documented
    assert group_sizes("bottleneck", 5, 22) == [6, 4, 2, 4, 6]  # w = 3, 2, 1, 2, 3
    assert group_sizes("uniform", 3, 7) == [3, 2, 2]
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config)
    design = LayerGroups(groups=[[LoRA(r=1, targets=["query"])], [LoRA(r=2, targets=["query"])],
                                 [LoRA(r=3, targets=["query"]), Bottleneck(bottleneck=4, targets=FFN_OUT)],
                                 [LoRA(r=4, targets=["query"])]])
    peftkit.attach(model, design, name="s4")
    ranks = {int(name.split(".")[3]): delta.parts[next(iter(delta.parts))].lora_A.shape[0]
             for name, _, delta in adapter_deltas(model, "s4") if name.endswith("query")}
    assert ranks == {0: 1, 1: 2, 2: 2, 3: 3, 4: 3, 5: 4}
    ffn = [name for name in peftkit.summary(model).per_module["s4"] if name.endswith("output.dense")]
    assert ffn == ["bert.encoder.layer.3.output.dense", "bert.encoder.layer.4.output.dense"]


@pytest.mark.parametrize("method", [
    {"method": "unipelt", "r": 2, "bottleneck": 4, "num_virtual_tokens": 3},
    {"method": "mam", "num_virtual_tokens": 4, "bottleneck": 4},
    {"method": "compose", "gates": "learned", "parts": [{"method": "lora", "r": 2, "targets": ["query"]},
                                                        {"method": "bottleneck", "preset": "pfeiffer", "bottleneck": 4}]},
    {"method": "layer_groups", "shape": "uniform", "groups": [[{"method": "lora", "r": 2, "targets": ["query"]}],
                                                              [{"method": "bottleneck", "preset": "parallel", "bottleneck": 4}]]},
], ids=["unipelt", "mam", "compose", "layer_groups"])
def test_peftkit_train_runs_hybrid_methods(method, tmp_path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, method=method)))
    config = load_config(path)
    assert config_from_mapping(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config
    result = run_training(config)
    assert result.steps == 2 and math.isfinite(result.after["loss"])
    saved = peftkit.adapters(result.model)["default"]
    assert saved.method == method["method"] and saved.modules_to_save == ["classifier"]
    config, tensors, _ = read_adapter(result.adapter_dir)
    assert config == saved.saved_config() and any(".parts.0." in key for key in tensors)

