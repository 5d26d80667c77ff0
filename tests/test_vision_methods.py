"""Vision PEFT on small random Dinov2 and ViT models: VPT (shallow, deep), AdaptFormer (the bottleneck adapter's
preset), Convpass against their formulas; mixed routed batches equal each row alone; merge refusals; files; learning;
the other methods on ViT layer names."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, Dinov2Config, Dinov2ForImageClassification,
                          Dinov2Model, ViTConfig, ViTForImageClassification, ViTModel)

import peftkit
from peftkit import (IA3, SSF, VPT, BitFit, Bottleneck, Compose, Convpass, LastK, LayerNormTuning, LoRA, PaFi,
                     StructuredMask, TargetError)
from peftkit.core.slot import delta_of
from peftkit.core.tokens import TokenError

from .checks import assert_merge_roundtrip, assert_routed_grads_match_rows, assert_routed_matches_rows
from .conftest import randomize

PATCH, IMAGE, WIDTH = 4, 16, 32  # a 4 × 4 grid of patches: 16 patch tokens after CLS
PATCHES = (IMAGE // PATCH) ** 2


def dinov2_config(num_labels: int = 3, initializer_range: float = 0.02) -> Dinov2Config:
    return Dinov2Config(hidden_size=WIDTH, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, patch_size=PATCH,
                        image_size=IMAGE, num_labels=num_labels, layerscale_value=0.5, initializer_range=initializer_range)


def vit_config() -> ViTConfig:
    return ViTConfig(hidden_size=WIDTH, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                     patch_size=PATCH, image_size=IMAGE, num_labels=3)


BACKBONES = {"dinov2": lambda: Dinov2Model(dinov2_config()), "vit": lambda: ViTModel(vit_config(), add_pooling_layer=False)}
CLASSIFIERS = {"dinov2": lambda: Dinov2ForImageClassification(dinov2_config()),
               "vit": lambda: ViTForImageClassification(vit_config())}


def build(kind: dict, name: str) -> nn.Module:
    torch.manual_seed(0)
    return kind[name]().eval()


def images(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def layers(backbone: nn.Module) -> nn.ModuleList:
    return backbone.encoder.layer if hasattr(backbone, "encoder") else backbone.layers


class Logits(nn.Module):
    """A classifier called with one image tensor, returning its logits (the shared routing checks call it so)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


# --- VPT ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", ["shallow", "deep"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_vpt_with_zero_tokens_is_the_base(backbone: str, depth: str) -> None:
    model, x = build(BACKBONES, backbone), images(3)
    with torch.no_grad():
        base = model(pixel_values=x).last_hidden_state
        peftkit.attach(model, VPT(num_tokens=0, depth=depth), name="empty")
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, base, rtol=0, atol=0)
        peftkit.attach(model, VPT(num_tokens=2, depth=depth), name="two")
        with peftkit.routed(model, ["empty", None, "two"]):  # zero tokens share the base rows' pass
            mixed = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(mixed[:2, :1 + PATCHES], base[:2], rtol=0, atol=0)


def hand_vpt(backbone: nn.Module, x: torch.Tensor, prompts: list[torch.Tensor]) -> torch.Tensor:
    """VPT written out: P_0 after CLS; before each later layer i with a prompt, P_i over the prompt positions."""
    p = prompts[0].shape[0]
    with peftkit.disabled(backbone):
        h = backbone.embeddings(x)
        h = torch.cat([h[:, :1], prompts[0].expand(len(x), -1, -1), h[:, 1:]], 1)
        for i, layer in enumerate(layers(backbone)):
            if 0 < i < len(prompts):
                h = torch.cat([h[:, :1], prompts[i].expand(len(x), -1, -1), h[:, 1 + p:]], 1)
            h = layer(h)
        return backbone.layernorm(h)


@pytest.mark.parametrize("depth", ["shallow", "deep"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_vpt_follows_its_formula(backbone: str, depth: str) -> None:
    model, x, p = build(BACKBONES, backbone), images(2), 3
    peftkit.attach(model, VPT(num_tokens=p, depth=depth))
    hosts = peftkit.core.registry.get_registry(model).hosts["default"]
    blocks = "encoder.layer" if backbone == "dinov2" else "layers"
    assert hosts == (["embeddings"] if depth == "shallow" else ["embeddings", f"{blocks}.1", f"{blocks}.2"])
    prompts = [delta_of(model.get_submodule(host), "default").tokens for host in hosts]
    assert all(prompt.shape == (p, WIDTH) for prompt in prompts)
    with torch.no_grad():
        out = model(pixel_values=x).last_hidden_state
        assert out.shape == (2, 1 + p + PATCHES, WIDTH)  # [CLS, prompts, patches]: p tokens longer
        torch.testing.assert_close(out, hand_vpt(model, x, prompts))
        if depth == "deep":  # the fresh prompts matter: without them the outputs differ
            assert not torch.allclose(out, hand_vpt(model, x, prompts[:1]), atol=1e-4)


def test_vpt_prompts_start_as_xavier_over_the_patch_fan_in() -> None:
    model = build(BACKBONES, "dinov2")
    peftkit.attach(model, VPT(num_tokens=400, depth="shallow"))
    tokens = delta_of(model.embeddings, "default").tokens
    bound = (6 / (3 * PATCH * PATCH + WIDTH)) ** 0.5
    assert tokens.abs().max() <= bound and tokens.abs().max() > 0.95 * bound and tokens.dtype == torch.float32


# --- AdaptFormer and Convpass ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", BACKBONES)
def test_adaptformer_is_a_scaled_parallel_adapter_beside_each_mlp(backbone: str) -> None:
    model = build(BACKBONES, backbone)
    config = Bottleneck.preset("adaptformer", bottleneck=8)
    assert (config.placement, config.scale, config.activation) == ("parallel", 0.1, "relu")
    assert Bottleneck.preset("adaptformer").bottleneck == 64
    peftkit.attach(model, config)
    randomize(model)
    mlps = [f"{name}.mlp" for name, _ in layers(model).named_children()]
    prefix = "encoder.layer." if backbone == "dinov2" else "layers."
    assert peftkit.core.registry.get_registry(model).hosts["default"] == [prefix + m for m in mlps]
    mlp = layers(model)[1].mlp
    delta = delta_of(mlp, "default")
    x = torch.randn(2, 1 + PATCHES, WIDTH)
    with torch.no_grad():
        with peftkit.disabled(model):
            block = mlp(x)
        expected = block + 0.1 * (F.relu(x @ delta.down.weight.T + delta.down.bias) @ delta.up.weight.T + delta.up.bias)
        torch.testing.assert_close(mlp(x), expected)
        assert not torch.allclose(mlp(x), block, atol=1e-4)


def hand_convpass(delta: nn.Module, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Convpass written out: the 3×3 convolution as a sum over each patch's zero-padded neighbours; the CLS token
    through the same convolution as a 1 × 1 image (the paper's code)."""
    act = lambda z: z * torch.sigmoid(1.702 * z)
    z = act(x @ delta.down.weight.T + delta.down.bias)
    w, b, side = delta.conv.weight, delta.conv.bias, IMAGE // PATCH
    grid = F.pad(z[:, 1:].reshape(len(x), side, side, -1), (0, 0, 1, 1, 1, 1))  # [B, side + 2, side + 2, c]
    patches = b + sum(grid[:, i:i + side, j:j + side] @ w[:, :, i, j].T for i in range(3) for j in range(3))
    cls = F.conv2d(z[:, :1].reshape(len(x), -1, 1, 1), w, b, padding=1).reshape(len(x), 1, -1)
    z = act(torch.cat([cls, patches.reshape(len(x), side * side, -1)], 1))
    return scale * (z @ delta.up.weight.T + delta.up.bias)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_convpass_follows_its_formula_beside_attention_and_mlp(backbone: str) -> None:
    model = build(BACKBONES, backbone)
    peftkit.attach(model, Convpass(dim=4, scale=0.5))
    hosts = peftkit.core.registry.get_registry(model).hosts["default"]
    assert len(hosts) == 6 and {h.rsplit(".", 1)[1] for h in hosts} == {"attention", "mlp"}
    delta = delta_of(layers(model)[0].attention, "default")
    assert torch.equal(delta.conv.weight[:, :, 1, 1], torch.eye(4)) and not delta.up.weight.any()  # a no-op at start
    randomize(model)
    x = torch.randn(2, 1 + PATCHES, WIDTH)
    for block in (layers(model)[0].attention, layers(model)[2].mlp):
        with torch.no_grad():
            with peftkit.disabled(model):
                base = block(x)
            out = block(x)
        first = (lambda o: o[0]) if isinstance(out, tuple) else (lambda o: o)  # attention returns (output, weights)
        torch.testing.assert_close(first(out), first(base) + hand_convpass(delta_of(block, "default"), x, 0.5))


def test_convpass_needs_a_square_patch_grid() -> None:
    model = build(BACKBONES, "dinov2")
    peftkit.attach(model, Convpass(leading_tokens=2))
    with pytest.raises(ValueError, match="square grid.*15 tokens follow the 2 leading"):
        model(pixel_values=images(1))


# --- mixed batches ---------------------------------------------------------------------------------------------------

MIXED = {"shallow": VPT(num_tokens=3, depth="shallow"), "deep": VPT(num_tokens=2, depth="deep"),
         "adaptformer": Bottleneck.preset("adaptformer", bottleneck=8), "convpass": Convpass(dim=4),
         "lora": LoRA(targets=["q_proj", "v_proj"], r=2)}
ROWS = ["deep", None, "adaptformer", "shallow", "convpass", "lora", "deep", "shallow", None, "lora", "convpass"]


def mixed_model(kind: dict, name: str, wrap: bool = False) -> nn.Module:
    model = Logits(build(kind, name)) if wrap else build(kind, name)
    for adapter, config in MIXED.items():
        peftkit.attach(model, config, name=adapter)
    randomize(model)
    return model


@pytest.mark.parametrize("backbone", BACKBONES)
def test_mixed_vision_adapters_equal_each_row_alone(backbone: str) -> None:
    """Rows of six kinds (two prompt counts, prompts only at the input or in every layer, the base) in one call:
    one pass per prompt layout, merged in row order and padded at the end with zeros."""
    model, x = mixed_model(BACKBONES, backbone), images(len(ROWS))
    with torch.no_grad():
        with peftkit.routed(model, ROWS):
            mixed = model(pixel_values=x).last_hidden_state
        assert mixed.shape == (len(ROWS), 1 + 3 + PATCHES, WIDTH)
        for row, name in enumerate(ROWS):
            if name is None:
                with peftkit.disabled(model):
                    alone = model(pixel_values=x[row:row + 1]).last_hidden_state[0]
            else:
                peftkit.activate(model, name)
                alone = model(pixel_values=x[row:row + 1]).last_hidden_state[0]
            torch.testing.assert_close(mixed[row, :len(alone)], alone, rtol=1e-5, atol=1e-5)
            assert not mixed[row, len(alone):].any()


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_mixed_vision_adapters_route_logits_and_gradients_per_row(classifier: str) -> None:
    wrapped = mixed_model(CLASSIFIERS, classifier, wrap=True)  # the outer module runs one pass per prompt layout
    peftkit.attach(wrapped, LoRA(targets=["model.classifier"], r=2), name="head")
    randomize(wrapped, "head")
    x = images(len(ROWS) + 1)
    assert_routed_matches_rows(wrapped, x, [*ROWS, "head"])
    assert_routed_grads_match_rows(wrapped, x, [*ROWS, "head"])


def test_rows_of_different_prompt_counts_are_refused_where_they_cannot_be_split() -> None:
    model = mixed_model(CLASSIFIERS, "dinov2")
    with peftkit.routed(model, ["shallow", "deep"]):
        with pytest.raises(TokenError, match="cannot take labels: compute the loss from the returned logits"):
            model(pixel_values=images(2), labels=torch.tensor([0, 1]))
        with pytest.raises(TokenError, match="rows of one pass insert different tokens at module 'dinov2.embeddings'"):
            model.dinov2(pixel_values=images(2))  # a submodule: no pass per layout
    peftkit.activate(model, ["shallow", "deep"])
    with pytest.raises(TokenError, match=r"adapters \['shallow', 'deep'\] both insert tokens"):
        model(pixel_values=images(1))


# --- merging, files, learning ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("adapter", "reason"), [("shallow", "extra inputs to the layers, not a weight"),
                                                 ("adaptformer", "no weight delta to fold"),
                                                 ("convpass", "no weight delta to fold")])
def test_vpt_adaptformer_and_convpass_refuse_to_merge_with_their_reason(adapter: str, reason: str) -> None:
    model = mixed_model(CLASSIFIERS, "dinov2")
    peftkit.activate(model, adapter)
    with pytest.raises(peftkit.MergeError, match=reason):
        peftkit.merge(model)


@pytest.mark.parametrize(("config", "changed"), [(LoRA(targets="all-linear", exclude=["classifier"], r=2),
                                                  "vit.layers.0.attention.q_proj.weight"),
                                                 (SSF(targets=["type:Linear", "type:LayerNorm"], exclude=["classifier"]),
                                                  "vit.layers.1.mlp.fc1.weight")])
def test_lora_and_ssf_merge_into_a_vit(config, changed: str) -> None:
    model = Logits(build(CLASSIFIERS, "vit"))
    peftkit.attach(model, config)
    randomize(model)
    assert_merge_roundtrip(model, images(2), f"model.{changed}")


@pytest.mark.parametrize("adapter", list(MIXED))
def test_vision_adapters_save_and_load(tmp_path, adapter: str) -> None:
    model, x = mixed_model(CLASSIFIERS, "dinov2"), images(4)
    peftkit.activate(model, adapter)
    with torch.no_grad():
        before = model(pixel_values=x).logits
    peftkit.save(model, tmp_path / adapter, adapter)
    fresh = build(CLASSIFIERS, "dinov2")
    peftkit.load(fresh, tmp_path / adapter)
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixel_values=x).logits, before, rtol=0, atol=0)


def quadrant_images(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright square in one of four quadrants on noise; the label is the quadrant."""
    generator = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(rows, 3, IMAGE, IMAGE, generator=generator)
    labels = torch.randint(0, 4, (rows,), generator=generator)
    half = IMAGE // 2
    for row, label in enumerate(labels.tolist()):
        top, left = half * (label // 2), half * (label % 2)
        x[row, :, top:top + half, left:left + half] += 2.0
    return x, labels


@pytest.mark.parametrize(("config", "lr"), [(VPT(num_tokens=4, depth="deep"), 3e-2),
                                            (Bottleneck.preset("adaptformer", bottleneck=16), 1e-1),
                                            (Convpass(dim=8), 3e-2)])
def test_vision_adapters_learn_a_tiny_image_task_with_a_frozen_head(config, lr: float) -> None:
    """Only the adapter trains (the random classifier stays frozen), so only it can classify better than chance.
    Weights drawn wider than transformers' 0.02 give attention that depends on the input, which prompts need."""
    torch.manual_seed(0)
    model = Dinov2ForImageClassification(dinov2_config(num_labels=4, initializer_range=0.3)).train()
    peftkit.attach(model, config)
    optimizer = torch.optim.Adam(peftkit.adapter_parameters(model, "default"), lr=lr)
    x, labels = quadrant_images(64, seed=0)
    losses = []
    for step in range(40):
        rows = slice(16 * (step % 4), 16 * (step % 4 + 1))
        loss = F.cross_entropy(model(pixel_values=x[rows]).logits, labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4  # one epoch of 4 batches each
    assert last < 0.75 * math.log(4) and last < 0.5 * first, losses  # well below guessing among 4 classes


# --- the other methods on ViT layer names ------------------------------------------------------------------------------

ON_VIT = {
    "lora all-linear": LoRA(targets="all-linear", exclude=["classifier"], r=2),
    "lora by name": LoRA(targets=["q_proj", "v_proj", "fc1", "fc2"], r=2),
    "ssf": SSF(targets=["type:Linear", "type:LayerNorm"], exclude=["classifier"]),
    "bitfit": BitFit(targets=["type:Linear", "type:LayerNorm"], exclude=["classifier"]),
    "ia3": IA3(targets=["k_proj", "v_proj", "fc2"], feedforward=["fc2"]),
    "layernorm": LayerNormTuning(),
    "lastk": LastK(k=1, targets=["type:Linear", "type:LayerNorm"]),
    "pafi": PaFi(targets="all-linear", exclude=["classifier"], fraction=0.05),
    "structured": StructuredMask(fraction=0.5, score="magnitude"),
}


@pytest.mark.parametrize("classifier", CLASSIFIERS)
@pytest.mark.parametrize("method", ON_VIT)
def test_methods_attach_to_vit_layer_names_and_train_a_step(classifier: str, method: str) -> None:
    model = build(CLASSIFIERS, classifier).train()
    peftkit.attach(model, ON_VIT[method].model_copy(update={"modules_to_save": ["classifier"]}))
    if isinstance(ON_VIT[method], StructuredMask):
        peftkit.select_units(model, "default")
    base = {n: p.clone() for n, p in model.named_parameters() if ".peftkit." not in n}
    trained = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier.")}
    assert trained, f"{method} trains nothing on {classifier}"
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, labels = quadrant_images(4, seed=1)
    F.cross_entropy(model(pixel_values=x).logits, labels % 3).backward()
    optimizer.step()
    moved = [n for n, p in model.named_parameters() if n in trained and not torch.equal(p, trained[n])]
    assert moved, f"{method}: no adapter tensor moved"
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_structured_masks_find_vit_mlp_units_and_heads() -> None:
    from peftkit.methods.selective.structured import unit_groups

    groups = unit_groups(build(CLASSIFIERS, "dinov2"), ["heads", "ffn"])
    assert [(g.kind, g.units) for g in groups] == [("heads", 2)] * 3 + [("ffn", 64)] * 3
    assert {m.host.rsplit(".", 1)[1] for g in groups if g.kind == "ffn" for m in g.members} == {"fc1", "fc2"}


# --- refusals on models these methods do not fit ---------------------------------------------------------------------

def tiny_bert() -> nn.Module:
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32))


def test_vpt_and_convpass_refuse_a_text_model_by_name() -> None:
    with pytest.raises(TargetError, match="module 'bert.embeddings' \\(BertEmbeddings\\) embeds no image patches"):
        peftkit.attach(tiny_bert(), VPT())
    with pytest.raises(TargetError, match="BertForSequenceClassification has no patch embedding"):
        peftkit.attach(tiny_bert(), Convpass())


def test_vpt_config_and_composition_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="shallow VPT uses none"):
        VPT(depth="shallow", blocks="encoder.layer")
    with pytest.raises(ValueError, match="exclude"):
        VPT(exclude=["embeddings"])
    with pytest.raises(ValueError, match="num_tokens"):
        VPT(num_tokens=-1)
    with pytest.raises(ValueError, match=r"parts\[1\] \(vpt\) inserts tokens into the sequence"):
        Compose(parts=[LoRA(targets=["q_proj"]), VPT()])
    with pytest.raises(TargetError, match="select the one patch embedding module"):
        peftkit.attach(build(BACKBONES, "dinov2"), VPT(targets=["type:Linear"]))
