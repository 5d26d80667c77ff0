"""SparseAdapter pruning (#21): LoRA and bottleneck adapters pruned at init by magnitude or SNIP to exactly the target
sparsity, kept so through optimizer steps, saved sparse (smaller file) and loaded with masks and values."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit import Bottleneck, LoRA
from peftkit.core.registry import adapter_deltas
from peftkit.core.weight_masks import weight_masks
from peftkit.efficient.sparse_adapter import prunable, prune_adapter
from peftkit.train import run_training
from tests.conftest import randomize
from tests.train_models import tiny_bert, tiny_config

METHODS = {"lora": LoRA(targets=["query", "value"], r=4),
           "bottleneck": Bottleneck(bottleneck=8, targets=["output.dense"])}
IDS = torch.randint(1, 100, (4, 6))
LABELS = torch.tensor([0, 1, 2, 1])


def model_with(config, randomized: bool = True):
    torch.manual_seed(0)
    model, _ = tiny_bert(3)
    peftkit.attach(model, config, name="a")
    if randomized:
        randomize(model, "a")
    return model


def zeros_of(model, name: str = "a") -> dict[str, int]:
    return {f"{host}.{path}": int((param == 0).sum()) for host, _, path, param in prunable(model, name)}


def expected_zeros(model, sparsity: float, name: str = "a") -> dict[str, int]:
    return {f"{host}.{path}": round(sparsity * param.numel()) for host, _, path, param in prunable(model, name)}


@pytest.mark.parametrize("method", METHODS)
def test_magnitude_keeps_the_largest_entries_of_each_weight(method: str) -> None:
    model = model_with(METHODS[method])
    before = {f"{host}.{path}": param.detach().clone() for host, _, path, param in prunable(model, "a")}
    masks = prune_adapter(model, "a", 0.75)
    assert zeros_of(model) == expected_zeros(model, 0.75)
    for key, weight in before.items():
        kept = weight.abs().flatten().topk(masks[key].sum().item()).indices
        assert set(kept.tolist()) == set(masks[key].flatten().nonzero().flatten().tolist()), key


def test_snip_ranks_by_weight_times_gradient() -> None:
    model = model_with(METHODS["lora"])
    params = {f"{host}.{path}": param for host, _, path, param in prunable(model, "a")}
    loss = F.cross_entropy(model(IDS).logits, LABELS)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    masks = prune_adapter(model, "a", 0.5, "snip", data=[({"input_ids": IDS}, LABELS)])
    for key, param in params.items():
        score = (param.detach() * grads[key]).abs()
        wanted = set(score.flatten().topk(int(masks[key].sum())).indices.tolist())
        assert wanted == set(masks[key].flatten().nonzero().flatten().tolist()), key
    assert zeros_of(model) == expected_zeros(model, 0.5)


def test_snip_on_a_fresh_lora_ranks_b_by_its_gradient_and_a_by_its_magnitude() -> None:
    """Fresh LoRA has B = 0: θ·g is zero everywhere for B (θ = 0) and for A (g = 0)."""
    model = model_with(METHODS["lora"], randomized=False)
    deltas = [d for _, _, d in adapter_deltas(model, "a") if hasattr(d, "lora_A")]
    a_before = [d.lora_A.detach().clone() for d in deltas]
    loss = F.cross_entropy(model(IDS).logits, LABELS)
    b_grads = torch.autograd.grad(loss, [d.lora_B for d in deltas])
    prune_adapter(model, "a", 0.5, "snip", data=[({"input_ids": IDS}, LABELS)])
    for delta, a, b_grad in zip(deltas, a_before, b_grads):
        keep_b, keep_a = weight_masks(delta).mask("lora_B"), weight_masks(delta).mask("lora_A")
        assert set(b_grad.abs().flatten().topk(int(keep_b.sum())).indices.tolist()) == \
            set(keep_b.flatten().nonzero().flatten().tolist())
        assert set(a.abs().flatten().topk(int(keep_a.sum())).indices.tolist()) == \
            set(keep_a.flatten().nonzero().flatten().tolist())


@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_peftkit_train_keeps_exactly_the_sparsity_and_the_file_round_trips(tmp_path, method: str) -> None:
    fields = {"lora": {"r": 4, "targets": ["query", "value"]}, "bottleneck": {"bottleneck": 8, "targets": ["output.dense"]}}
    cfg = tiny_config(tmp_path, method={"method": method, **fields[method], "prune": {"sparsity": 0.8,
                                                                                      "method": "snip"}},
                      schedule={"epochs": 2, "batch_size": 4}, optimizer={"lr": 0.05, "weight_decay": 0.1},
                      eval={"restore_best": False})
    result = run_training(cfg)
    model = result.model
    assert result.steps == 8
    assert zeros_of(model, "default") == expected_zeros(model, 0.8, "default")  # after 8 AdamW steps, weight decay
    for _, delta, path, param in prunable(model, "default"):
        mask = weight_masks(delta).mask(path)
        assert bool((param[~mask] == 0).all()) and bool((param[mask] != 0).all())  # kept entries trained, pruned zero

    dense, _ = tiny_bert(5)
    peftkit.attach(dense, LoRA(r=4, targets=["query", "value"]) if method == "lora" else
                   Bottleneck(bottleneck=8, targets=["output.dense"]), name="dense")
    peftkit.save(dense, tmp_path / "dense", "dense")
    sparse_file = (result.adapter_dir / "adapter.safetensors").stat().st_size
    assert sparse_file < (tmp_path / "dense" / "adapter.safetensors").stat().st_size

    loaded, _ = tiny_bert(5)
    peftkit.load(loaded, result.adapter_dir)
    original = {k: v for k, v in model.state_dict().items() if ".peftkit." in k}
    restored = {k: v for k, v in loaded.state_dict().items() if ".peftkit." in k}
    assert original.keys() == restored.keys()
    for key, value in original.items():
        assert torch.equal(value, restored[key]), key  # values and masks alike
    assert peftkit.adapters(loaded)["default"].prune.sparsity == 0.8


def test_a_loaded_sparse_adapter_keeps_its_mask_while_training_on() -> None:
    model = model_with(METHODS["bottleneck"])
    prune_adapter(model, "a", 0.6)
    zeros = zeros_of(model)
    optimizer = torch.optim.AdamW(peftkit.adapter_parameters(model, "a"), lr=0.1)
    for _ in range(3):
        F.cross_entropy(model(IDS).logits, LABELS).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert zeros_of(model) == zeros  # gradients are masked: a plain loop keeps the sparsity too


def test_magnitude_pruning_in_the_config_happens_at_attach() -> None:
    model = model_with(LoRA(targets=["query"], r=4, prune={"sparsity": 0.5}), randomized=False)
    pruned = {f"{host}.{path}": int((~weight_masks(delta).mask(path)).sum()) for host, delta, path, _ in
              prunable(model, "a")}
    assert pruned == expected_zeros(model, 0.5)  # B starts at zero: a random half of it is kept


def test_bad_pruning_is_refused_by_name() -> None:
    model = model_with(METHODS["lora"])
    with pytest.raises(ValueError, match="needs at least one batch of data"):
        prune_adapter(model, "a", 0.5, "snip")
    with pytest.raises(ValueError, match="sparsity"):
        prune_adapter(model, "a", 1.0)
    peftkit.attach(model, peftkit.IA3(targets=["key"], feedforward=[]), name="ia3")
    with pytest.raises(ValueError, match="ia3.*no pruning option"):
        prune_adapter(model, "ia3", 0.5)
    with pytest.raises(ValueError, match="rewrites the base weights"):
        LoRA(targets=["query"], init="pissa", prune={"sparsity": 0.5})
