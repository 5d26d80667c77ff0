"""CLIP prompt learning and feature adaptation (docs/clip.md) on a tiny random CLIPModel: each method's logits equal its
paper's formula computed here by hand, gradients reach only the method's parameters, Tip-Adapter with α = 0 is
zero-shot CLIP, saved adapters load back exactly, mixed batches route per row, and bad inputs are named errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit import CLIPAdapter, CLIPClassifier, CoCoOp, CoOp, LoRA, TipAdapter, build_cache
from peftkit.core.registry import adapter_deltas
from peftkit.core.targets import TargetError
from tests.clip_models import CLASSES, images, tiny_clip, tiny_tokenizer
from tests.conftest import TinyNet

SHOTS = torch.tensor([0, 1, 2, 0, 1, 2, 2])


@pytest.fixture
def classifier() -> CLIPClassifier:
    tokenizer = tiny_tokenizer()
    return CLIPClassifier(tiny_clip(tokenizer), tokenizer, CLASSES)


def delta(classifier: CLIPClassifier, name: str):
    return next(d for _, _, d in adapter_deltas(classifier, name))


def randomized(classifier: CLIPClassifier, name: str) -> None:
    """Every parameter of the adapter moved off its init, so a check cannot pass on start values."""
    with torch.no_grad():
        for param in peftkit.adapter_parameters(classifier, name):
            param.add_(torch.randn_like(param) * 0.3)


def with_cache(classifier: CLIPClassifier, name: str) -> torch.Tensor:
    """Fill Tip-Adapter `name`'s cache from 7 shots; returns the shots' image features."""
    with torch.no_grad():
        features = classifier.image_features(images(len(SHOTS), seed=2))
    build_cache(classifier, name, features, SHOTS)
    return features


# --- the formulas, by hand -----------------------------------------------------------------------------------------

def scale(classifier: CLIPClassifier) -> torch.Tensor:
    return classifier.clip.logit_scale.exp().detach()


def cosine_logits(classifier: CLIPClassifier, f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """s · cos(f_i, w_k) as a loop over rows and classes."""
    return torch.stack([torch.stack([scale(classifier) * F.cosine_similarity(fi, wk, dim=0) for wk in wi])
                        for fi, wi in zip(f, w if w.dim() == 3 else [w] * len(f))])


def encode(classifier: CLIPClassifier, embeds: torch.Tensor) -> torch.Tensor:
    """CLIP's text encoder on one unpadded prompt's token embeddings [T, d], as CoOp's TextEncoder writes it: positions
    added, causal transformer, final LayerNorm, the last (end) token projected."""
    text = classifier.clip.text_model
    length = embeds.shape[0]
    hidden = (embeds + text.embeddings.position_embedding.weight[:length])[None]
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
    for layer in text.encoder.layers:
        hidden = layer(hidden, attention_mask=causal)
    return classifier.clip.text_projection(text.final_layer_norm(hidden)[0, -1])


def token_embeddings(classifier: CLIPClassifier, text: str, specials: bool = False) -> torch.Tensor:
    ids = classifier.head.tokenizer(text, add_special_tokens=specials)["input_ids"]
    return classifier.clip.text_model.embeddings.token_embedding(torch.tensor(ids))


def prompt(classifier: CLIPClassifier, name: str, context: torch.Tensor, position: str) -> torch.Tensor:
    """[SOS] [V]… [CLASS] [V]… . [EOS] with the context around the name as CoOp's `position` says."""
    sos, eos = token_embeddings(classifier, "", specials=True)  # the start and end tokens alone
    before = {"end": context.shape[0], "middle": context.shape[0] // 2, "front": 0}[position]
    parts = [sos[None], context[:before], token_embeddings(classifier, name), context[before:],
             token_embeddings(classifier, "."), eos[None]]
    return torch.cat(parts)


def zero_shot_features(classifier: CLIPClassifier) -> torch.Tensor:
    return torch.stack([encode(classifier, token_embeddings(classifier, f"a photo of a {name}.", specials=True))
                        for name in CLASSES])


# --- zero-shot CLIP ------------------------------------------------------------------------------------------------

def test_zero_shot_logits_are_clips_own_image_text_logits(classifier) -> None:
    x = images(4)
    batch = classifier.head.tokenizer([f"a photo of a {name}." for name in CLASSES], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = classifier.clip(pixel_values=x, **batch).logits_per_image
        torch.testing.assert_close(classifier(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(classifier.head.class_features, zero_shot_features(classifier), rtol=1e-5, atol=1e-5)


def test_several_templates_average_their_normalised_text_features(classifier) -> None:
    templates = ["a photo of a {}.", "a {} in the dark."]
    ensemble = CLIPClassifier(classifier.clip, classifier.head.tokenizer, CLASSES, templates)
    with torch.no_grad():
        single = [CLIPClassifier(classifier.clip, classifier.head.tokenizer, CLASSES, t).head.class_features
                  for t in templates]
    expected = (F.normalize(single[0], dim=-1) + F.normalize(single[1], dim=-1)) / 2
    torch.testing.assert_close(ensemble.head.class_features, expected)


def test_weights_load_from_a_local_directory(classifier, tmp_path) -> None:
    classifier.clip.save_pretrained(tmp_path)
    classifier.head.tokenizer.save_pretrained(tmp_path)
    loaded = CLIPClassifier.from_pretrained(tmp_path, CLASSES)
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), classifier(x))


# --- each method's formula -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True], ids=["unified", "csc"])
def test_coop_logits_follow_the_formula(classifier, position: str, class_specific: bool) -> None:
    peftkit.attach(classifier, CoOp(n_ctx=3, class_position=position, class_specific=class_specific))
    ctx = delta(classifier, "default").ctx
    x = images(4)
    with torch.no_grad():
        contexts = ctx if class_specific else [ctx] * len(CLASSES)
        w = torch.stack([encode(classifier, prompt(classifier, name, context, position))
                         for name, context in zip(CLASSES, contexts)])
        expected = cosine_logits(classifier, classifier.image_features(x), w)
        torch.testing.assert_close(classifier(x), expected, rtol=1e-5, atol=1e-5)


def test_coop_context_can_start_from_words(classifier) -> None:
    """Context initialised from "a photo of a" (here 9 letter tokens) is the zero-shot prompt: the same logits."""
    peftkit.attach(classifier, CoOp(n_ctx=9, init_text="a photo of a"))
    x = images(3)
    with torch.no_grad():
        adapted = classifier(x)
        with peftkit.disabled(classifier):
            torch.testing.assert_close(adapted, classifier(x), rtol=1e-5, atol=1e-5)


def test_cocoop_logits_follow_the_formula(classifier) -> None:
    peftkit.attach(classifier, CoCoOp(n_ctx=2))
    randomized(classifier, "default")
    learner = delta(classifier, "default")
    first, second = learner.meta_net[0], learner.meta_net[2]
    x = images(3)
    with torch.no_grad():
        f = classifier.image_features(x)
        shift = F.relu(F.normalize(f, dim=-1) @ first.weight.T + first.bias) @ second.weight.T + second.bias  # π(x)
        w = torch.stack([torch.stack([encode(classifier, prompt(classifier, name, learner.ctx + pi, "end"))
                                      for name in CLASSES]) for pi in shift])  # [R, K, D]: each image its prompts
        torch.testing.assert_close(classifier(x), cosine_logits(classifier, f, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("image, text", [(True, False), (False, True), (True, True)], ids=["image", "text", "both"])
def test_clip_adapter_logits_follow_the_formula(classifier, image: bool, text: bool) -> None:
    peftkit.attach(classifier, CLIPAdapter(alpha=0.3, reduction=8, image=image, text=text))
    adapter = delta(classifier, "default")
    x = images(4)

    def blended(layers, features):  # α ReLU(f W_1) W_2 + (1 − α) f
        if layers is None:
            return features
        return 0.3 * (F.relu(features @ layers[0].weight.T) @ layers[2].weight.T) + 0.7 * features

    with torch.no_grad():
        f = blended(adapter.image_adapter, classifier.image_features(x))
        w = blended(adapter.text_adapter, zero_shot_features(classifier))
        torch.testing.assert_close(classifier(x), cosine_logits(classifier, f, w), rtol=1e-5, atol=1e-5)


def test_clip_adapter_output_relu_is_the_released_codes_extra_relu(classifier) -> None:
    peftkit.attach(classifier, CLIPAdapter(alpha=1.0, reduction=8, output_relu=True))
    layers = delta(classifier, "default").image_adapter
    x = images(2)
    with torch.no_grad():
        f = F.relu(F.relu(classifier.image_features(x) @ layers[0].weight.T) @ layers[2].weight.T)
        torch.testing.assert_close(classifier(x), cosine_logits(classifier, f, zero_shot_features(classifier)),
                                   rtol=1e-5, atol=1e-5)


def test_tip_adapter_logits_follow_the_formula(classifier) -> None:
    peftkit.attach(classifier, TipAdapter(alpha=1.7, beta=5.5))
    keys = F.normalize(with_cache(classifier, "default"), dim=-1)
    x = images(4)
    with torch.no_grad():
        f = F.normalize(classifier.image_features(x), dim=-1)
        cache = 1.7 * torch.exp(-5.5 * (1 - f @ keys.T)) @ F.one_hot(SHOTS, len(CLASSES)).float()
        expected = cache + cosine_logits(classifier, f, zero_shot_features(classifier))
        torch.testing.assert_close(classifier(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [TipAdapter(alpha=0.0, beta=3.0), CLIPAdapter(alpha=0.0, text=True)],
                         ids=["tip_adapter", "clip_adapter"])
def test_alpha_zero_is_zero_shot_clip(classifier, config) -> None:
    x = images(4)
    with torch.no_grad():
        zero_shot = classifier(x)
    peftkit.attach(classifier, config)
    if isinstance(config, TipAdapter):
        with_cache(classifier, "default")
    with torch.no_grad():
        assert torch.equal(classifier(x), zero_shot)


# --- training ------------------------------------------------------------------------------------------------------

METHODS = {"coop": CoOp(n_ctx=2), "coop_csc": CoOp(n_ctx=2, class_specific=True), "cocoop": CoCoOp(n_ctx=2),
           "clip_adapter": CLIPAdapter(reduction=8, text=True), "tip_adapter_f": TipAdapter(fine_tune=True)}


def attached(classifier: CLIPClassifier, config, name: str = "default") -> None:
    peftkit.attach(classifier, config, name=name)
    if isinstance(config, TipAdapter):
        with_cache(classifier, name)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_only_the_methods_parameters(classifier, method: str) -> None:
    attached(classifier, METHODS[method])
    labels = torch.tensor([0, 2, 1, 1])
    F.cross_entropy(classifier(images(4)), labels).backward()
    own = {id(p) for p in peftkit.adapter_parameters(classifier, "default")}
    with_grad = {name for name, p in classifier.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert own and with_grad == {name for name, p in classifier.named_parameters() if id(p) in own}
    assert all(not p.requires_grad for p in classifier.clip.parameters())


def test_tip_adapter_is_training_free_and_tip_adapter_f_trains_the_keys_only(classifier) -> None:
    peftkit.attach(classifier, TipAdapter(), name="tip")
    with_cache(classifier, "tip")
    assert list(peftkit.adapter_parameters(classifier, "tip")) == []

    attached(classifier, TipAdapter(beta=5.0, fine_tune=True), name="tip_f")
    cache = delta(classifier, "tip_f")
    assert [p is cache.keys for p in peftkit.adapter_parameters(classifier, "tip_f")] == [True]
    keys, labels, base = cache.keys.detach().clone(), cache.labels.clone(), copy.deepcopy(classifier.clip.state_dict())
    x, y = images(8, seed=5), torch.tensor([2, 0, 1, 1, 0, 2, 2, 1])
    optimizer = torch.optim.AdamW(peftkit.adapter_parameters(classifier, "tip_f"), lr=0.05)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(classifier(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(cache.keys, keys) and torch.equal(cache.labels, labels)
    assert all(torch.equal(v, base[k]) for k, v in classifier.clip.state_dict().items())


# --- save / load, routing ------------------------------------------------------------------------------------------

ROUND_TRIP = {**METHODS, "tip_adapter": TipAdapter(alpha=2.0, beta=4.0),
              "coop_words": CoOp(n_ctx=9, init_text="a photo of a", class_position="middle")}


@pytest.mark.parametrize("method", ROUND_TRIP)
def test_save_and_load_round_trip_exactly(classifier, tmp_path, method: str) -> None:
    attached(classifier, ROUND_TRIP[method])
    randomized(classifier, "default")
    x = images(3)
    with torch.no_grad():
        before = classifier(x)
    peftkit.save(classifier, tmp_path / "adapter")

    fresh = CLIPClassifier(copy.deepcopy(classifier.clip), classifier.head.tokenizer, CLASSES)
    assert peftkit.load(fresh, tmp_path / "adapter") == "default"
    assert "init_text" not in peftkit.adapters(fresh)["default"].model_dump(exclude_none=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), before)


def test_mixed_batches_route_each_row_to_its_adapter(classifier) -> None:
    names = ["coop", "cocoop", "clip_adapter", "tip", None]
    for name, config in zip(names, [CoOp(n_ctx=2), CoCoOp(n_ctx=2), CLIPAdapter(reduction=8, text=True), TipAdapter()]):
        attached(classifier, config, name=name)
        randomized(classifier, name)
    rows = [names[i % len(names)] for i in range(8)]
    x = images(8)
    with torch.no_grad(), peftkit.routed(classifier, rows):
        mixed = classifier(x)
    for i, name in enumerate(rows):
        with torch.no_grad():
            if name is None:
                with peftkit.disabled(classifier):
                    alone = classifier(x[i:i + 1])
            else:
                peftkit.activate(classifier, name)
                alone = classifier(x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_a_cache_adds_to_the_prompt_learner_active_before_it(classifier) -> None:
    attached(classifier, CoOp(n_ctx=2), name="coop")
    attached(classifier, TipAdapter(alpha=0.5), name="tip")
    x = images(3)
    with torch.no_grad():
        peftkit.activate(classifier, "coop")
        prompts = classifier(x)
        peftkit.activate(classifier, "tip")
        cache = classifier(x)
        with peftkit.disabled(classifier):
            cache -= classifier(x)
        peftkit.activate(classifier, ["coop", "tip"])
        torch.testing.assert_close(classifier(x), prompts + cache, rtol=1e-5, atol=1e-5)


# --- bad inputs ----------------------------------------------------------------------------------------------------

def test_bad_classifier_inputs_are_named(classifier) -> None:
    clip, tokenizer = classifier.clip, classifier.head.tokenizer
    with pytest.raises(ValueError, match="class_names is empty"):
        CLIPClassifier(clip, tokenizer, [])
    with pytest.raises(ValueError, match=r"class names \['cat'\] appear more than once"):
        CLIPClassifier(clip, tokenizer, ["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="must hold '\\{\\}' exactly once"):
        CLIPClassifier(clip, tokenizer, CLASSES, "a photo")
    with pytest.raises(TypeError, match="wraps a transformers CLIPModel, not a TinyNet"):
        CLIPClassifier(TinyNet(), tokenizer, CLASSES)


def test_bad_cache_inputs_are_named(classifier) -> None:
    peftkit.attach(classifier, TipAdapter(), name="tip")
    with pytest.raises(ValueError, match="cache is empty: fill it with peftkit.build_cache"):
        classifier(images(1))
    features = torch.randn(3, 32)
    with pytest.raises(ValueError, match=r"cache features must be \[N, 32\].*got shape \(3, 16\)"):
        build_cache(classifier, "tip", torch.randn(3, 16), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="cache label 3 is out of range: the classifier has 3 classes"):
        build_cache(classifier, "tip", features, torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="cache label -1 is out of range"):
        build_cache(classifier, "tip", features, torch.tensor([0, -1, 1]))
    for labels in (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([True, False, True]), torch.tensor([0, 1])):
        with pytest.raises(ValueError, match="must be 3 integer class indices"):
            build_cache(classifier, "tip", features, labels)
    with pytest.raises(ValueError, match="image features have width 16, but the class features 32"):
        classifier.head(torch.randn(2, 16))  # precomputed features straight into the head
    peftkit.attach(classifier, CoOp(n_ctx=2), name="coop")
    with pytest.raises(ValueError, match="'coop' is a coop adapter, not tip_adapter"):
        build_cache(classifier, "coop", features, torch.tensor([0, 1, 2]))


def test_bad_method_configs_are_named(classifier) -> None:
    with pytest.raises(ValueError, match="init_text 'a photo' is 6 tokens, but n_ctx is 4: set n_ctx=6"):
        peftkit.attach(classifier, CoOp(n_ctx=4, init_text="a photo"))
    with pytest.raises(ValueError, match="'red fox' with 30 context vectors is 39 tokens long.*reads at most 32"):
        peftkit.attach(classifier, CoOp(n_ctx=30))
    with pytest.raises(ValueError, match="image and text are both false"):
        CLIPAdapter(image=False)
    with pytest.raises(ValueError, match=r"exclude\n\s+Input should be None"):
        CoCoOp(exclude=["head"])
    assert peftkit.adapters(classifier) == {}


def test_a_clip_method_on_another_model_is_refused_by_name() -> None:
    with pytest.raises(TargetError, match="coop adapts the class head of a peftkit.CLIPClassifier, and TinyNet has"):
        peftkit.attach(TinyNet(), CoOp())


def test_an_adapter_on_the_text_tower_is_refused_by_name(classifier) -> None:
    peftkit.attach(classifier, LoRA(targets=r"clip\.text_model\..*q_proj", r=2), name="text_lora")
    with pytest.raises(ValueError, match="adapter 'text_lora' sits on CLIP's text tower .* would never be seen"):
        classifier(images(1))
