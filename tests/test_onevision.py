"""LLaVA-OneVision layouts beyond the default tiny image (the contract tests cover that one).

``anyres_max_N`` downsampling of large canvases and multi-image prompts (a thumbnail and one
newline per image): the adapter's layouts equal the model's own packed features, every canvas
token belongs to exactly one crop patch, and every method that runs on OneVision keeps its
exact count, equals the unpatched model when keeping all, and keeps cached generation equal to
uncached generation (fixed selections).
"""

from __future__ import annotations

import functools

import pytest
import torch

import vlprune
from vlprune.adapters import get_adapter
from vlprune.adapters.base import ImageLayout
from vlprune.methods._vision_common import canvas_tokens, partition_tokens
from vlprune.testing import tiny_config, tiny_image, tiny_processor

SIZES = [(150, 100), (100, 150), (96, 96), (200, 40), (48, 48)]
BIG = 10**6
METHODS = [m for m in vlprune.list_methods() if m not in ("hired", "globalcom2")]


@functools.cache
def _model(aspect_ratio: str):
    """Tiny OneVision with ``vision_aspect_ratio=aspect_ratio`` (``anyres_max_1`` downsamples
    every canvas larger than 1.21 crops)."""
    from vlprune.testing import tiny_model

    model = tiny_model("llava_onevision")
    model.config.vision_aspect_ratio = aspect_ratio
    return model


def _processor(aspect_ratio: str):
    processor = tiny_processor("llava_onevision")
    processor.vision_aspect_ratio = aspect_ratio
    return processor


def _single_images(aspect_ratio: str, sizes: list[tuple[int, int]]):
    words = ["w1 w2", "w3 w4 w5 w6", "w7"]
    text = [f"<s> <image> {words[i % 3]}" for i in range(len(sizes))]
    images = [tiny_image(i, size) for i, size in enumerate(sizes)]
    return _processor(aspect_ratio)(text=text, images=images, padding=True, return_tensors="pt")


def _multi_images(aspect_ratio: str = "anyres_max_9"):
    """Sample 0: two images (thumbnails only, one newline each); sample 1: one AnyRes image."""
    images = [[tiny_image(0, (150, 100)), tiny_image(1, (100, 150))], [tiny_image(2, (96, 96))]]
    text = ["<s> <image> w1 <image> w2", "<s> <image> w3 w4"]
    return _processor(aspect_ratio)(text=text, images=images, padding=True, return_tensors="pt")


@pytest.mark.parametrize("aspect_ratio", ["anyres_max_9", "anyres_max_1"])
def test_layouts_equal_the_models_packed_features(aspect_ratio: str) -> None:
    """Per image: placeholders == the model's packed feature rows == the adapter's layout;
    ``anyres_max_1`` downsamples every canvas larger than 1.21 crops (``highres_source``)."""
    model = _model(aspect_ratio)
    inputs = _single_images(aspect_ratio, SIZES)
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            batch_num_images=inputs["batch_num_images"]).pooler_output
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    layouts = get_adapter(model).image_layouts(dict(inputs), sum(counts))
    assert [lay.num_tokens for lay in layouts] == [f.shape[0] for f in feats] == counts
    downsampled = [lay.highres_source is not None for lay in layouts]
    assert any(downsampled) == (aspect_ratio == "anyres_max_1")


def test_multi_image_layouts() -> None:
    """Images of a multi-image prompt are a 6×6 thumbnail + one newline (37 tokens)."""
    model, inputs = _model("anyres_max_9"), _multi_images()
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    layouts = get_adapter(model).image_layouts(dict(inputs), sum(counts))
    assert [lay.num_tokens for lay in layouts[:2]] == [37, 37]
    assert layouts[0].suffix == 1 and layouts[0].crop_grid is None
    assert layouts[2].crop_grid == (2, 2)


def test_downsampled_canvas_token_is_its_centre_patch() -> None:
    """A 8×12 patch canvas downsampled to 4×7 tokens: token (R, C) belongs to patch
    (⌊(R+½)·2⌋, ⌊(C+½)·12/7⌋); each token appears once over the crops, newlines never."""
    layout = ImageLayout(num_tokens=36 + 4 * 8, grid=(6, 6), crop_grid=(2, 2), highres=(4, 7),
                         highres_offset=(2, 0), newline=True, highres_source=(8, 12))
    canvas = canvas_tokens(layout)
    assert canvas.shape == (8, 12)
    assert int(canvas[1, 0]) == 36 and int(canvas[1, 2]) == 37 and int(canvas[3, 0]) == 36 + 8
    assert int(canvas[0, 0]) == -1
    tokens = torch.cat(partition_tokens(layout)[1:])
    tokens = tokens[tokens >= 0]
    content = [36 + r * 8 + c for r in range(4) for c in range(7)]
    assert sorted(tokens.tolist()) == content


@pytest.mark.parametrize("method", METHODS)
def test_methods_on_downsampled_and_multi_image_prompts(method: str) -> None:
    """Downsampled canvases (batch of 3 sizes) and a multi-image batch (2 + 1 images): keep-all
    == unpatched; budget 5 keeps exactly 5 per image (per sample for request-scoped methods,
    per image summed by FlowCut's LLM step; MMTok's budget is per crop). FlowCut refuses a
    downsampled canvas with a clear error."""
    cases = (("anyres_max_1", _single_images("anyres_max_1", SIZES[:3]), [1, 1, 1]),
             ("anyres_max_9", _multi_images(), [2, 1]))
    for aspect_ratio, inputs, images in cases:
        model = _model(aspect_ratio)
        if method == "flowcut" and aspect_ratio == "anyres_max_1":
            ran: list[int] = []
            layer = get_adapter(model).vision_layers[0].register_forward_hook(
                lambda *_, ran=ran: ran.append(1))
            try:
                with vlprune.patch(model, method, budget=5), pytest.raises(
                        NotImplementedError, match="downsamples"):
                    model(**inputs)
            finally:
                layer.remove()
            assert ran == []  # refused before the first vision layer ran
            continue
        with torch.no_grad():
            reference = model(**inputs).logits
            with vlprune.patch(model, method, budget=BIG):
                torch.testing.assert_close(model(**inputs).logits, reference, atol=1e-5,
                                           rtol=0)
            with vlprune.patch(model, method, budget=5) as handle:
                model(**inputs)
                stats = handle.stats
        if handle.method.scope == "request":
            assert stats.kept_tokens == [5] * len(images)
        elif method == "flowcut":
            assert stats.kept_tokens == [5 * n for n in images]
        elif method != "mmtok":
            assert stats.kept_per_image == [5] * sum(images)


def test_multi_image_generate_cache_equals_no_cache() -> None:
    """A fixed selection on a multi-image batch: cached greedy tokens == uncached ones."""
    model, inputs = _model("anyres_max_9"), _multi_images()
    with vlprune.patch(model, "uniform", budget=6) as handle, torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
        assert handle.stats.kept_per_image == [6, 6, 6]
    assert torch.equal(cached, uncached)


def test_default_feature_strategy_is_rejected() -> None:
    """SigLIP has no CLS token: the ``default`` strategy (drop row 0) is refused clearly."""
    config = tiny_config("llava_onevision")
    model = _model("anyres_max_9")
    inputs = _single_images("anyres_max_9", SIZES[:1])
    adapter = get_adapter(model)
    try:
        model.config.vision_feature_select_strategy = "default"
        with pytest.raises(NotImplementedError, match="`full` feature strategy"):
            adapter.image_layouts(dict(inputs), 140)
    finally:
        model.config.vision_feature_select_strategy = config.vision_feature_select_strategy
