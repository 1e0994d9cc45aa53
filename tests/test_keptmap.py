"""``handle.kept_images()``: the tokens alive after the last cut, mapped onto each image's grids.

Oracles are independent of the mapping: hand-listed indices and grid cells (``fixed`` /
``fixed_layer``), the zero rows the encoder cut leaves in the language model's input (rows it
dropped), and the original positions of the rows that reach the last decoder layer.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

import vlprune
from tests.helpers import cached_model as _model
from vlprune.adapters import ImageLayout
from vlprune.keptmap import kept_image, layout_views, processor_fit
from vlprune.testing import FAMILIES, tiny_image, tiny_inputs, tiny_model, tiny_processor

# Per family: kept local indices of the ``fixed`` oracle and the (view, row, col) cells they
# are, by hand. LLaVA: 6x6 grid. NeXT and OneVision (150x100 image): 6x6 thumbnail (0..35),
# then an 8x12 high-res canvas whose row r starts at 36 + 13r (12 cells + 1 newline: 48 is row
# 0's newline). Qwen (168x112 image; Qwen3-VL / Qwen3.5: 192x128 at patch 16): 4x6 merged
# tokens.
FIXED = {
    "llava": ([0, 7, 20, 35], [("image", 0, 0), ("image", 1, 1), ("image", 3, 2),
                                ("image", 5, 5)]),
    "llava_next": ([3, 35, 36, 47, 48, 36 + 13 * 7 + 11],
                   [("thumbnail", 0, 3), ("thumbnail", 5, 5), ("high-res", 0, 0),
                    ("high-res", 0, 11), ("high-res", 7, 11)]),
    "qwen2_vl": ([1, 6, 23], [("image", 0, 1), ("image", 1, 0), ("image", 3, 5)]),
    "qwen2_5_vl": ([0, 11, 12], [("image", 0, 0), ("image", 1, 5), ("image", 2, 0)]),
    "qwen3_vl": ([2, 7, 21], [("image", 0, 2), ("image", 1, 1), ("image", 3, 3)]),
    "qwen3_vl_moe": ([0, 5, 18], [("image", 0, 0), ("image", 0, 5), ("image", 3, 0)]),
    "qwen3_5": ([4, 13, 23], [("image", 0, 4), ("image", 2, 1), ("image", 3, 5)]),
    "llava_onevision": ([0, 20, 36 + 13 * 2 + 5, 36 + 13 * 4 + 12, 36 + 13 * 7],
                        [("thumbnail", 0, 0), ("thumbnail", 3, 2), ("high-res", 2, 5),
                         ("high-res", 7, 0)]),
}


def _run(family: str, method: str, batch: int = 2, **options) -> tuple[list, object, dict]:
    """Patch, one prefill of a padded batch; (kept images, stats, inputs)."""
    model, inputs = _model(family), tiny_inputs(family, batch=batch)
    with vlprune.patch(model, method, **options) as handle, torch.no_grad():
        model(**inputs)
        return handle.kept_images(), handle.stats, inputs


def _image_positions(inputs: dict, family: str) -> list[torch.Tensor]:
    """Prompt positions of each sample's image tokens (one image per sample)."""
    image_id = _model(family).config.image_token_id
    return [(row == image_id).nonzero()[:, 0] for row in inputs["input_ids"]]


def _cells(image) -> set[tuple[str, int, int]]:
    return {(v.name, int(r), int(c)) for v in image.views for r, c in v.kept.nonzero().tolist()}


def test_layout_views_follow_the_layout():
    """Grids come from the layout alone: frames after the prefix, then the newline-strided
    canvas."""
    qwen = dict(layout_views(ImageLayout(num_tokens=12, grid=(2, 3), frames=2)))
    assert list(qwen) == ["frame 0", "frame 1"]
    assert qwen["frame 1"].tolist() == [[6, 7, 8], [9, 10, 11]]
    full = dict(layout_views(ImageLayout(num_tokens=5, grid=(2, 2), prefix=1)))
    assert full["image"].tolist() == [[1, 2], [3, 4]]
    layout = ImageLayout(num_tokens=4 + 2 * 4, grid=(2, 2), crop_grid=(1, 2), highres=(2, 3),
                         newline=True)
    views = dict(layout_views(layout))
    assert views["high-res"].tolist() == [[4, 5, 6], [8, 9, 10]]  # 7 and 11: newlines


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_selection_lands_on_its_cells(family):
    """``fixed`` keeps hand-picked indices: every image reports exactly them, on the cells
    listed by hand; a newline token counts as kept but lies on no cell."""
    indices, cells = FIXED[family]
    images, stats, _ = _run(family, "fixed", budget=100, indices=indices)
    assert [image.sample for image in images] == [0, 1]
    for image in images:
        assert image.kept.tolist() == indices
        assert _cells(image) == set(cells)
    assert [image.n_kept for image in images] == stats.kept_tokens


def test_encoder_cut_keeps_the_surviving_units():
    """FlowCut on LLaVA-1.5 cuts only inside the vision encoder: the rows it dropped reach the
    language model as zeros before the vision-side cut removes them, so the kept tokens are
    the non-zero rows."""
    model, inputs = _model("llava"), tiny_inputs("llava", batch=2)
    seen = {}

    def remember(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].clone()

    hook = model.model.language_model.register_forward_pre_hook(
        remember, with_kwargs=True, prepend=True)
    try:
        with vlprune.patch(model, "flowcut", budget=6) as handle, torch.no_grad():
            model(**inputs)
            images = handle.kept_images()
    finally:
        hook.remove()
    for b, (image, pos) in enumerate(zip(images, _image_positions(inputs, "llava"))):
        nonzero = seen["embeds"][b, pos].abs().sum(-1) > 0
        assert image.kept.tolist() == nonzero.nonzero()[:, 0].tolist()
        assert image.n_kept == 6


def _rope_rows(model, inputs, layer: int) -> torch.Tensor:
    """(B, L, D) rotary cos rows entering decoder layer ``layer`` in one forward."""
    seen = {}

    def remember(module, args, kwargs):
        cos = kwargs["position_embeddings"][0]
        seen["cos"] = cos.expand(inputs["input_ids"].shape[0], *cos.shape[1:]).clone()

    hook = model.model.language_model.layers[layer].register_forward_pre_hook(
        remember, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen["cos"]


@pytest.mark.parametrize(("family", "method", "options"), [
    ("llava", "fastv", {}),
    ("llava", "transprune", {}),
    ("llava_next", "flowcut", {}),
    ("llava_next", "todre", {"tau": 0.0}),
    ("llava_next", "todre", {"tau": 1.0}),
    ("qwen2_vl", "flowcut", {}),
    ("qwen2_5_vl", "fastv", {}),
    ("qwen3_vl", "fastv", {}),  # decoder cut before the last DeepStack layer
    ("qwen3_5", "fastv", {}),  # decoder cut reaching a linear-attention layer
    ("llava_onevision", "flowcut", {}),  # SigLIP encoder cut (global query), then the LLM step
])
def test_cuts_keep_the_rows_of_the_last_layer(family, method, options):
    """Kept tokens = the image positions whose rotary embedding (unique per original position:
    1-D or M-RoPE) is among the rows entering the last decoder layer, read against an unpatched
    forward. Covers decoder cuts (one or several), FlowCut's encoder + LLM steps, and ToDRE's
    vision + decoder stages (τ = 1 removes every image)."""
    model, inputs = _model(family), tiny_inputs(family, batch=2)
    full = _rope_rows(model, inputs, 0)
    with vlprune.patch(model, method, budget=6, **options) as handle:
        last = _rope_rows(model, inputs, -1)
        images, stats = handle.kept_images(), handle.stats
    for b, (image, pos) in enumerate(zip(images, _image_positions(inputs, family))):
        same = (full[b, pos][:, None] == last[b][None]).all(-1).any(-1)
        assert image.kept.tolist() == same.nonzero()[:, 0].tolist()
    assert [image.n_kept for image in images] == stats.kept_tokens
    if options.get("tau") == 1.0:
        assert stats.kept_tokens == [0, 0]
    else:
        assert all(0 < n < stats.visual_tokens[0] for n in stats.kept_tokens)


def _onevision_run(aspect_ratio: str, texts: list[str], images: list, indices: list[int]):
    """Kept images of ``fixed`` on a tiny OneVision model and processor set to
    ``aspect_ratio``."""
    model = tiny_model("llava_onevision", vision_aspect_ratio=aspect_ratio)
    processor = tiny_processor("llava_onevision")
    processor.vision_aspect_ratio = aspect_ratio
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    with vlprune.patch(model, "fixed", budget=100, indices=indices) as handle, torch.no_grad():
        model(**inputs)
        return handle.kept_images()


def test_onevision_downsampled_canvas():
    """``anyres_max_1`` downsamples the 8x12 patch canvas of a 150x100 image to 4x7 tokens
    (row r starts at 36 + 8r, its newline last): the high-res view is that token canvas,
    stretched over the image like the thumbnail. 150x100 px: token (0, 0) covers x < 150/7, y
    < 25 (21 x 25 pixel centres), token (1, 6) x ≥ 6·150/7, 25 ≤ y < 50 (21 x 25)."""
    (image,) = _onevision_run("anyres_max_1", ["<s> <image> w1 w2"],
                              [tiny_image(0, (150, 100))], [1, 36, 36 + 8 + 6, 36 + 8 * 3 + 7])
    assert image.layout.highres_source == (8, 12)
    assert [(v.name, tuple(v.kept.shape)) for v in image.views] == [
        ("thumbnail", (6, 6)), ("high-res", (4, 7))]
    assert _cells(image) == {("thumbnail", 0, 1), ("high-res", 0, 0), ("high-res", 1, 6)}
    assert image.n_kept == 4  # the newline counts, on no cell
    mask = image.pixel_masks(150, 100)["high-res"]
    expected = torch.zeros(100, 150, dtype=torch.bool)
    expected[:25, :21] = True
    expected[25:50, 129:] = True
    assert torch.equal(mask, expected)


def test_onevision_multi_image_prompt():
    """Sample 0 holds two images (each a 6x6 thumbnail + one newline, index 36), sample 1 one
    AnyRes 96x96 image (6x6 thumbnail, then a 12x12 canvas from index 36): every image keeps
    indices 0, 35 and 36, on cells listed by hand; the multi-image newline is on no cell."""
    images = [[tiny_image(0, (150, 100)), tiny_image(1, (100, 150))], [tiny_image(2, (96, 96))]]
    kept = _onevision_run("anyres_max_9", ["<s> <image> w1 <image> w2", "<s> <image> w3 w4"],
                          images, [0, 35, 36])
    assert [image.sample for image in kept] == [0, 0, 1]
    assert [image.n_tokens for image in kept] == [37, 37, 36 + 12 * 13]
    for image in kept[:2]:
        assert [view.name for view in image.views] == ["image"]
        assert _cells(image) == {("image", 0, 0), ("image", 5, 5)}
    assert _cells(kept[2]) == {("thumbnail", 0, 0), ("thumbnail", 5, 5), ("high-res", 0, 0)}
    assert all(image.kept.tolist() == [0, 35, 36] for image in kept)


def test_fixed_layer_on_merged_tokens():
    """A decoder cut on Qwen keeps the listed visual ordinals, on their merged 2x2 cells."""
    images, _, _ = _run("qwen2_vl", "fixed_layer", budget=100, indices=[2, 9, 13], layer=2)
    for image in images:
        assert image.kept.tolist() == [2, 9, 13]
        assert _cells(image) == {("image", 0, 2), ("image", 1, 3), ("image", 2, 1)}


@pytest.mark.parametrize("method", ["hiprune", "fastv"])
def test_generate_reports_its_prefill(method):
    """Decode steps reuse the pruned cache: after ``generate`` the map is the prefill's."""
    model, inputs = _model("llava"), tiny_inputs("llava", batch=2)
    with vlprune.patch(model, method, budget=5) as handle, torch.no_grad():
        model(**inputs)
        after_forward = [image.kept.tolist() for image in handle.kept_images()]
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert [image.kept.tolist() for image in handle.kept_images()] == after_forward


def test_beams_repeat_their_prompts_map():
    """``generate(num_beams=2)`` repeats each prompt row (its image encoded once): every row
    reports its prompt's image, kept as in a plain forward of the same prompts."""
    model, inputs = _model("llava_next"), tiny_inputs("llava_next", batch=2)
    with vlprune.patch(model, "hiprune", budget=6) as handle, torch.no_grad():
        model(**inputs)
        single = [image.kept.tolist() for image in handle.kept_images()]
        model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)
        beams = handle.kept_images()
    assert [image.sample for image in beams] == [0, 1, 2, 3]
    assert [image.kept.tolist() for image in beams] == [single[0], single[0],
                                                        single[1], single[1]]


def test_each_thread_sees_its_own_last_prefill():
    """Like ``handle.stats``, the map is the calling thread's last prefill: a prefill in
    another thread (another prompt) neither shows here nor replaces this thread's map."""
    model = _model("llava")
    one, two = tiny_inputs("llava", batch=1), tiny_inputs("llava", batch=2, seed=1)
    with vlprune.patch(model, "fastv", budget=5) as handle, torch.no_grad():
        model(**one)
        mine = [image.kept.tolist() for image in handle.kept_images()]
        seen = {}

        def other() -> None:
            seen["before"] = handle.kept_images()
            model(**two)
            seen["after"] = [image.sample for image in handle.kept_images()]

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert seen == {"before": [], "after": [0, 1]}
        assert [image.kept.tolist() for image in handle.kept_images()] == mine


def test_empty_before_a_prefill_and_after_a_text_only_one():
    model = _model("llava")
    with vlprune.patch(model, "random", budget=4) as handle, torch.no_grad():
        assert handle.kept_images() == []
        model(**tiny_inputs("llava"))
        assert len(handle.kept_images()) == 1
        model(input_ids=torch.tensor([[1, 20, 21]]), attention_mask=torch.ones(1, 3).long())
        assert handle.kept_images() == []


def test_pixel_mask_fits():
    """A 4x4 grid keeping cells (0, 0), (1, 0) and (3, 3) on an 8x4 image: stretched over it
    (2x1-px cells), on its centred 4x4 square (crop, 1-px cells from column 2) or on the 8x8
    square around it (pad, 2-px cells from row -2: only row-1 cells are visible)."""
    view = kept_image(ImageLayout(num_tokens=16, grid=(4, 4)), torch.tensor([0, 4, 15])).views[0]

    def pixels(fit: str) -> set[tuple[int, int]]:
        return {tuple(p) for p in view.pixel_mask(8, 4, fit).nonzero().tolist()}

    assert pixels("stretch") == {(0, 0), (0, 1), (1, 0), (1, 1), (3, 6), (3, 7)}
    assert pixels("crop") == {(0, 2), (1, 2), (3, 5)}
    assert pixels("pad") == {(0, 0), (0, 1), (1, 0), (1, 1)}
    with pytest.raises(ValueError, match="fit"):
        view.pixel_mask(8, 4, "zoom")


def test_processor_fit():
    assert processor_fit(tiny_processor("llava").image_processor) == "crop"
    assert processor_fit(tiny_processor("llava_next").image_processor) == "stretch"
    assert processor_fit(tiny_processor("qwen2_vl").image_processor) == "stretch"
    assert processor_fit(tiny_processor("llava_onevision").image_processor) == "stretch"
    assert processor_fit(tiny_processor("qwen3_vl").image_processor) == "stretch"
    assert processor_fit(LlavaImageProcessorPil(do_pad=True)) == "pad"
    odd = CLIPImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224,
                                                                        "width": 224})
    with pytest.raises(ValueError, match="pass `fit`"):
        processor_fit(odd)
