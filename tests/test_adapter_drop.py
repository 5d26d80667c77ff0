"""AdapterDrop (#21): adapters skipped in the first n layers, for LoRA and bottleneck adapters: n = 0 is no drop
exactly, dropped layers run no adapter code and get no gradient (the backward stops at layer n), robust drops draw n
per step in training while evaluation keeps the fixed n, and the option is saved with the adapter."""
from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import Bottleneck, LoRA
from peftkit.core.merging import MergeError
from peftkit.core.registry import adapter_deltas
from peftkit.efficient.adapter_drop import RobustDrop, adapter_drop, dropped_layers
from peftkit.train import Callback, run_training
from tests.conftest import randomize
from tests.train_models import tiny_bert, tiny_config

METHODS = {"lora": LoRA(targets=["query", "value"], r=2),
           "bottleneck": Bottleneck(bottleneck=4, targets=["output.dense"])}
LAYERS = 4


def model_with(method: str, layers: int = LAYERS):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    peftkit.attach(model, METHODS[method], name="a")
    randomize(model, "a")
    return model.eval()


IDS = torch.randint(1, 100, (3, 7))


def layer_of(host: str) -> int:
    return int(host.split("layer.")[1].split(".")[0])


@pytest.mark.parametrize("method", METHODS)
def test_dropping_no_layer_is_exactly_no_drop(method: str) -> None:
    model = model_with(method)
    before = model(IDS).logits
    adapter_drop(model, "a", 0)
    assert torch.equal(model(IDS).logits, before)
    adapter_drop(model, "a", 2)
    assert not torch.allclose(model(IDS).logits, before)
    adapter_drop(model, "a", 0)
    assert torch.equal(model(IDS).logits, before)


@pytest.mark.parametrize("method", METHODS)
def test_dropped_layers_equal_the_adapter_removed_there_and_run_no_adapter_code(method: str) -> None:
    model = model_with(method)
    adapter_drop(model, "a", 2)
    calls = {}
    for host, _, delta in adapter_deltas(model, "a"):
        for hook in ("add_increment_", "increment", "transform"):
            def counted(*args, _host=host, _real=getattr(delta, hook), **kwargs):
                calls[_host] = calls.get(_host, 0) + 1
                return _real(*args, **kwargs)
            setattr(delta, hook, counted)
    dropped = model(IDS).logits
    assert calls and all(layer_of(host) >= 2 for host in calls), calls  # layers 0, 1: no adapter code ran
    assert {layer_of(host) for host in calls} == {2, 3}

    reference = model_with(method)  # the same weights, with the first two layers' adapters zeroed
    with torch.no_grad():
        for host, _, delta in adapter_deltas(reference, "a"):
            if layer_of(host) < 2:
                for name, p in delta.named_parameters():
                    if name in ("lora_B", "up.weight", "up.bias"):
                        p.zero_()
    torch.testing.assert_close(dropped, reference(IDS).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_routed_rows_drop_only_their_own_adapters_layers(method: str) -> None:
    model = model_with(method)
    peftkit.attach(model, METHODS[method], name="b")
    randomize(model, "b")
    adapter_drop(model, "a", 2)
    rows = ["a", "b", None]
    with peftkit.routed(model, rows):
        mixed = model(IDS).logits
    for i, name in enumerate(rows):
        with peftkit.routed(model, [name]):
            torch.testing.assert_close(mixed[i], model(IDS[i:i + 1]).logits[0], rtol=1e-5, atol=1e-5)
    peftkit.activate(model, "a")
    torch.testing.assert_close(mixed[0], model(IDS[:1]).logits[0], rtol=1e-5, atol=1e-5)


def test_backward_stops_at_the_first_kept_layer() -> None:
    """Nothing below layer n has a trainable delta, so autograd records none of those layers: their outputs have no
    graph, and the dropped deltas get no gradient."""
    model = model_with("lora").train()
    adapter_drop(model, "a", 2)
    outputs = {}
    for i, layer in enumerate(model.bert.encoder.layer):
        layer.register_forward_hook(lambda module, args, out, i=i: outputs.__setitem__(i, out))
    model(IDS).logits.square().sum().backward()
    assert [outputs[i].requires_grad for i in range(LAYERS)] == [False, False, True, True]
    assert outputs[0].grad_fn is None and outputs[1].grad_fn is None
    for host, _, delta in adapter_deltas(model, "a"):
        assert (delta.lora_A.grad is None) == (layer_of(host) < 2), host


def test_inference_uses_the_fixed_n_and_training_the_drawn_one() -> None:
    model = model_with("lora")
    adapter_drop(model, "a", 1, robust=True, seed=3)
    plan = dropped_layers(model, "a")
    step = RobustDrop(plan, LAYERS, seed=3)
    draws = []
    for t in range(40):
        step.on_step_end(type("T", (), {"step": t})())
        draws.append(plan.in_training)
    assert set(draws) == set(range(LAYERS))  # uniform over {0, …, L−1}
    assert draws == [RobustDrop(plan, LAYERS, seed=3).draw(t) for t in range(40)]  # a function of (seed, step)
    plan.in_training = 3
    deltas = [(layer_of(host), delta) for host, _, delta in adapter_deltas(model, "a")]
    model.train()
    assert [delta.acts_on_output for layer, delta in deltas] == [layer >= 3 for layer, _ in deltas]
    model.eval()
    assert [delta.acts_on_output for layer, delta in deltas] == [layer >= 1 for layer, _ in deltas]


class DrawnLayers(Callback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_step_end(self, trainer) -> None:  # runs after the method's steps: the next step's n
        self.seen.append(dropped_layers(trainer.model, "default").in_training)


def test_peftkit_train_draws_robust_n_per_step_and_saves_the_option(tmp_path) -> None:
    cfg = tiny_config(tmp_path, method={"method": "lora", "r": 2, "targets": ["query", "value"],
                                        "adapter_drop": {"first_layers": 1, "robust": True}},
                      schedule={"epochs": 1, "batch_size": 2}, eval={"restore_best": False})
    drawn = DrawnLayers()
    result = run_training(cfg, callbacks=[drawn])
    assert drawn.seen == [RobustDrop(None, 2, 0).draw(t) for t in range(1, result.steps + 1)]
    assert len(set(drawn.seen)) == 2  # tiny BERT has 2 layers: n ∈ {0, 1}
    model, _ = tiny_bert(5)
    peftkit.load(model, result.adapter_dir)
    assert peftkit.adapters(model)["default"].adapter_drop.first_layers == 1
    assert dropped_layers(model, "default").at_inference == 1


@pytest.mark.parametrize("method", METHODS)
def test_a_saved_adapter_loads_with_its_drop(tmp_path, method: str) -> None:
    model = model_with(method)
    adapter_drop(model, "a", 3)
    expected = model(IDS).logits
    peftkit.save(model, tmp_path / "a", "a")
    fresh = model_with(method)
    peftkit.remove(fresh, "a")
    peftkit.load(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh.eval()(IDS).logits, expected)


def test_merging_and_peft_export_are_refused_while_layers_drop(tmp_path) -> None:
    model = model_with("lora")
    adapter_drop(model, "a", 1)
    with pytest.raises(MergeError, match="AdapterDrop skips this layer's delta"):
        peftkit.merge(model)
    with pytest.raises(ValueError, match="PEFT has no AdapterDrop"):
        peftkit.save(model, tmp_path / "peft", "a", format="peft")
    adapter_drop(model, "a", 0)
    peftkit.merge(model)  # nothing dropped: merging is allowed again


def test_bad_drops_are_refused_by_name() -> None:
    model = model_with("lora")
    with pytest.raises(ValueError, match="would drop adapter 'a' from every layer"):
        adapter_drop(model, "a", LAYERS)
    assert dropped_layers(model, "a") is None  # nothing changed
    peftkit.attach(model, peftkit.IA3(targets=["key", "value"], feedforward=[]), name="ia3")
    with pytest.raises(ValueError, match="ia3.*no AdapterDrop option"):
        adapter_drop(model, "ia3", 1)
    with pytest.raises(ValueError, match="adapter_drop or prune, which a hybrid does not apply per part"):
        peftkit.Compose(LoRA(targets=["query"], adapter_drop={"first_layers": 1}))
    with pytest.raises(ValueError, match="relora runs training steps of its own"):
        peftkit.ReLoRA(targets=["query"], restart_every=2, adapter_drop={"first_layers": 1})
