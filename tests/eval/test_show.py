"""``vlprune show``: the PNG's highlighted pixels are exactly the kept tokens' patches.

Pixel oracle: each kept index's cell, worked out by hand from each family's geometry (LLaVA 6x6
patches; LLaVA-NeXT and LLaVA-OneVision 6x6 thumbnail + 8x12 unpadded canvas with a newline per
row, OneVision's ``anyres_max`` canvas downsampled to 4x7; Qwen 4x6 merged 2x2 patches), laid
over the panel: inside a kept cell a pixel is the scaled image's, outside it is dimmed.
Covered: vision-side selections (``fixed`` keeps known indices), cuts inside the vision encoder
and in the decoder.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlprune.cli import main as cli_main
from vlprune.eval.show import DIM, keep_maps, render
from vlprune.eval.showcase import Showcase, load_showcase, prompt_builder
from vlprune.keptmap import processor_fit
from vlprune.testing import DEFAULT_IMAGE_SIZE, tiny_image, tiny_model, tiny_processor

# Token grids per family (default tiny image sizes): LLaVA 6x6; NeXT and OneVision (150x100) a
# 6x6 thumbnail (indices 0..35), then an 8x12 unpadded canvas whose row r starts at 36 + 13r (12
# cells and one newline token); Qwen (168x112; Qwen3-VL / Qwen3.5 192x128 at patch 16) 4x6
# merged 2x2 patches.
ANYRES = ("llava_next", "llava_onevision")
GRIDS = {
    "llava": {"image": (6, 6)},
    "llava_next": {"thumbnail": (6, 6), "high-res": (8, 12)},
    "qwen2_vl": {"image": (4, 6)},
    "qwen2_5_vl": {"image": (4, 6)},
    "qwen3_vl": {"image": (4, 6)},
    "qwen3_vl_moe": {"image": (4, 6)},
    "llava_onevision": {"thumbnail": (6, 6), "high-res": (8, 12)},
    "qwen3_5": {"image": (4, 6)},
}
FIXED = {"llava": [0, 7, 20, 35], "llava_next": [3, 35, 36, 47, 48, 36 + 13 * 7 + 11],
         "qwen2_vl": [1, 6, 23], "qwen2_5_vl": [0, 11, 12], "qwen3_vl": [2, 7, 21],
         "qwen3_vl_moe": [0, 5, 18], "llava_onevision": [0, 20, 48, 36 + 13 * 2 + 5, 36 + 13 * 7],
         "qwen3_5": [4, 13, 23]}
RUNS = [
    *[(family, "fixed", {"indices": FIXED[family]}) for family in GRIDS],
    ("llava", "flowcut", {}),  # cut inside the vision encoder only
    ("qwen2_vl", "flowcut", {}),  # encoder cut, then the LLM step
    ("qwen2_5_vl", "fastv", {}),  # decoder cut
    ("llava_next", "transprune", {}),  # several decoder cuts
    ("llava_next", "todre", {"tau": 0.0}),  # vision stage + decoder stage
    ("qwen3_vl", "flowcut", {}),  # encoder cut with DeepStack features, then the LLM step
    ("llava_onevision", "fastv", {}),  # decoder cut on thumbnail + canvas
]


def _cells(family: str, indices: list[int]) -> dict[str, list[tuple[int, int]]]:
    """The (row, col) cell of each kept index, per grid, by hand (NeXT newlines have none)."""
    cells: dict[str, list[tuple[int, int]]] = {view: [] for view in GRIDS[family]}
    for i in indices:
        if family not in ANYRES or i < 36:
            cells[next(iter(GRIDS[family]))].append(divmod(i, 6))
        elif (i - 36) % 13 < 12:
            cells["high-res"].append(divmod(i - 36, 13))
    return cells


@functools.cache
def _showcase(family: str) -> Showcase:
    model, processor = tiny_model(family), tiny_processor(family)
    return Showcase(family, model, processor, prompt_builder(processor, model.config),
                    "w1 w2 w3", processor_fit(processor.image_processor))


def _expected(cells: list[tuple[int, int]], grid: tuple[int, int],
              size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: pixels whose centre falls in a listed cell of a ``grid`` stretched over a
    ``size`` = (W, H) panel."""
    (rows, cols), (width, height) = grid, size
    mask = np.zeros((height, width), dtype=bool)
    for r, c in cells:
        y0, y1 = math.ceil(r * height / rows - 0.5), math.ceil((r + 1) * height / rows - 0.5)
        x0, x1 = math.ceil(c * width / cols - 0.5), math.ceil((c + 1) * width / cols - 0.5)
        mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize(("family", "method", "options"), RUNS)
def test_highlighted_pixels_are_the_kept_patches(family, method, options, tmp_path):
    """Every family and cut point (the kept indices themselves are checked against independent
    oracles in tests/test_keptmap.py); ``fixed`` keeps known indices."""
    image = tiny_image(3, DEFAULT_IMAGE_SIZE[family])
    kept = keep_maps(_showcase(family), image, [method], budget=6 if method != "fixed" else 100,
                     options={method: options})
    indices = kept[method].kept.tolist()
    if method == "fixed":
        assert indices == FIXED[family]
    else:
        assert 0 < len(indices) < kept[method].n_tokens
    picture, boxes = render(image, kept, size=2 * max(image.size))
    picture.save(tmp_path / "show.png")
    png = np.asarray(Image.open(tmp_path / "show.png"))
    width, height = 2 * image.width, 2 * image.height
    scaled = np.asarray(image.resize((width, height), Image.BILINEAR))
    dimmed = (scaled.astype(np.float32) * DIM).astype(np.uint8)
    assert set(boxes) == {(method, view) for view in GRIDS[family]}
    for view, cells in _cells(family, indices).items():
        x, y = boxes[(method, view)]
        panel = png[y:y + height, x:x + width]
        mask = _expected(cells, GRIDS[family][view], (width, height))
        assert (panel[mask] == scaled[mask]).all()
        assert (panel[~mask] == dimmed[~mask]).all()
    assert any(cells for cells in _cells(family, indices).values())


def test_onevision_downsampled_canvas_and_refusals(tmp_path):
    """``anyres_max_1`` downsamples the 150x100 image's 8x12 canvas to 4x7 tokens (row r from
    36 + 8r, newline last): kept cells of that token canvas are lit, stretched over the image.
    FlowCut refuses such a canvas in the prefill and HiRED the model (no CLS): both are
    reported, not drawn."""
    model = tiny_model("llava_onevision", vision_aspect_ratio="anyres_max_1")
    processor = tiny_processor("llava_onevision")
    processor.vision_aspect_ratio = "anyres_max_1"
    showcase = Showcase("llava_onevision", model, processor,
                        prompt_builder(processor, model.config), "w1 w2", "stretch")
    image = tiny_image(3, (150, 100))
    kept = keep_maps(showcase, image, ["fixed", "flowcut", "hired"], budget=100,
                     options={"fixed": {"indices": [1, 36 + 6, 36 + 8 * 2 + 3, 36 + 7]}})
    assert "downsamples" in kept["flowcut"] and "hired" in kept["hired"]
    picture, boxes = render(image, {"fixed": kept["fixed"]}, size=300)
    picture.save(tmp_path / "show.png")
    png = np.asarray(Image.open(tmp_path / "show.png"))
    scaled = np.asarray(image.resize((300, 200), Image.BILINEAR))
    dimmed = (scaled.astype(np.float32) * DIM).astype(np.uint8)
    for view, grid, cells in (("thumbnail", (6, 6), [(0, 1)]),
                              ("high-res", (4, 7), [(0, 6), (2, 3)])):
        x, y = boxes[("fixed", view)]
        panel, mask = png[y:y + 200, x:x + 300], _expected(cells, grid, (300, 200))
        assert (panel[mask] == scaled[mask]).all()
        assert (panel[~mask] == dimmed[~mask]).all()


@pytest.mark.parametrize(("preset", "size", "grids"), [
    ("qwen3-vl-8b", (128, 96), [(3, 4)]),  # 96x128 px at 32 px per merged token
    # 729 thumbnail tokens; 1x2 crops of 384 px (27x54 patches) unpadded to 27x36 (+ newlines)
    ("llava-onevision-7b", (400, 300), [(27, 27), (27, 36)]),
])
def test_new_family_presets_run_as_their_mini_twins(preset, size, grids):
    """The mini twins' processors give the preset geometry (hand-computed token grids)."""
    showcase = load_showcase(preset)
    assert showcase.fit == "stretch"
    kept = keep_maps(showcase, tiny_image(0, size), ["uniform"], budget=8)["uniform"]
    assert [tuple(view.kept.shape) for view in kept.views] == grids
    assert kept.n_kept == 8


def test_unsupported_methods_are_reported_not_drawn():
    """HiRED needs a CLS token (no Qwen): reported with the reason; the others still run."""
    image = tiny_image(1, DEFAULT_IMAGE_SIZE["qwen2_vl"])
    kept = keep_maps(_showcase("qwen2_vl"), image, ["hired", "uniform"], budget=6)
    assert isinstance(kept["hired"], str) and "hired" in kept["hired"]
    assert kept["uniform"].n_kept == 6


def test_show_command_on_the_toy_model(tmp_path, capsys):
    """A non-square image on the toy LLaVA (CLIP centre crop): one grid PNG, one per method."""
    image = tmp_path / "photo.png"
    tiny_image(2, (120, 90)).save(image)
    out = tmp_path / "out" / "show.png"
    cli_main(["show", str(image), "--model", "toy", "--methods", "fastv,hiprune", "--split",
              "--out", str(out)])
    printed = capsys.readouterr().out
    assert "fastv: kept 64 of 576 tokens" in printed
    assert "hiprune: kept 64 of 576 tokens" in printed
    for path in (out, out.with_name("show_fastv.png"), out.with_name("show_hiprune.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(out).width > Image.open(out.with_name("show_fastv.png")).width


@pytest.mark.parametrize(("args", "message"), [
    (["{missing}"], "no image file"),
    (["{image}", "--budget", "0"], "expected an int ≥ 1"),
    (["{image}", "--ratio", "1.5"], "fraction in (0, 1]"),
    (["{image}", "--methods", "uniform,nosuch"], "unknown `method`"),
    (["{image}", "--model", "llava-1.5-13b"], "unknown preset"),
    (["{image}", "--model", "timm:vit_base_patch16_224"], "timm models"),
    (["{image}", "--size", "4"], "expected an int ≥ 8"),
    (["{image}", "--out", "{folder}"], "is a folder"),
])
def test_show_command_rejects_bad_input(tmp_path, capsys, args, message):
    """Every bad argument ends ``vlprune show`` while parsing: exit code 2, one line on stderr
    naming the problem, no model loaded."""
    image = tmp_path / "photo.png"
    tiny_image(2).save(image)
    names = {"missing": tmp_path / "missing.png", "image": image, "folder": tmp_path}
    with pytest.raises(SystemExit) as info:
        cli_main(["show", *(a.format(**names) for a in args)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_full_size_preset_runs_as_its_mini_twin():
    showcase = load_showcase("llava-1.5-7b")
    assert showcase.model.config.text_config.hidden_size == 64
    assert showcase.fit == "crop"
    kept = keep_maps(showcase, tiny_image(0, (336, 336)), ["uniform"], budget=64)
    assert (kept["uniform"].n_kept, kept["uniform"].n_tokens) == (64, 576)


def test_checkpoint_directory(tmp_path):
    model, processor = tiny_model("llava_next"), tiny_processor("llava_next")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    showcase = load_showcase(str(tmp_path))
    assert showcase.fit == "stretch"
    kept = keep_maps(showcase, tiny_image(0, (150, 100)), ["random"], budget=10)
    assert kept["random"].n_kept == 10
    assert [view.name for view in kept["random"].views] == ["thumbnail", "high-res"]
    assert torch.equal(kept["random"].kept, kept["random"].kept.sort().values)
