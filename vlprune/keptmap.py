"""Where the kept visual tokens of a pruned forward sit on the image.

``handle.kept_images()`` returns, for every image of the last prefill (prompt order), a
:class:`KeptImage`: the image's token indices still alive after the *last* cut (vision-side,
inside the vision encoder, or in the decoder: what the last decoder layer sees), and one
:class:`KeptView` per token grid of the image, read from the adapter's
:class:`~vlprune.adapters.base.ImageLayout` alone:

- ``grid`` (``frames`` of them): the whole image (LLaVA-1.5; an image of a LLaVA-OneVision
  multi-image prompt), the thumbnail (LLaVA-NeXT, LLaVA-OneVision), one frame of merged 2×2
  patches (Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5);
- ``highres`` (LLaVA-NeXT, LLaVA-OneVision): the unpadded high-res canvas of tokens (OneVision's
  ``anyres_max`` canvas after its downsampling; it still spans the unpadded image). Newline
  tokens (one per canvas row, or one after a multi-image thumbnail) and any prefix token (CLS
  under the ``full`` strategy) have no place on the image: they count as kept tokens but belong
  to no view.

:meth:`KeptView.pixel_mask` maps a grid onto image pixels. How a grid covers the image is the
processor's doing (``fit``): ``"stretch"`` (the grid spans the whole image: LLaVA-NeXT /
OneVision thumbnail and unpadded canvas, Qwen's resize), ``"crop"`` (the centred square of side
``min(W, H)``: CLIP's resize-shortest-edge + centre crop, the Hugging Face LLaVA-1.5 default) or
``"pad"`` (the image padded to a centred square, the original LLaVA-1.5 code);
:func:`processor_fit` reads it off an image processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.hooks.images import prompt_layouts, split_images

if TYPE_CHECKING:
    from vlprune.handle import PatchHandle
    from vlprune.hooks.vision import PrefillRecord

__all__ = ["FITS", "KeptImage", "KeptView", "kept_images", "layout_views", "processor_fit"]

FITS = ("stretch", "crop", "pad")


@dataclass(frozen=True)
class KeptView:
    """One token grid of an image and which of its cells survived.

    ``name``: "image", "thumbnail", "high-res" or "frame t"; ``tokens`` (rows, cols): the
    layout index of each cell; ``kept`` (rows, cols) bool.
    """

    name: str
    tokens: torch.Tensor
    kept: torch.Tensor

    def pixel_mask(self, width: int, height: int, fit: str = "stretch") -> torch.Tensor:
        """(height, width) bool over a ``width`` × ``height`` image: True on pixels whose centre
        lies in a kept cell once the grid is laid over the image as ``fit`` says (see the
        module docstring); pixels the grid does not cover are False."""
        left, top, right, bottom = fit_box(width, height, fit)
        rows, cols = self.kept.shape
        ys = _cells(height, top, bottom, rows, self.kept.device)
        xs = _cells(width, left, right, cols, self.kept.device)
        inside = (ys >= 0)[:, None] & (xs >= 0)[None, :]
        return self.kept[ys.clamp(min=0)][:, xs.clamp(min=0)] & inside


@dataclass(frozen=True)
class KeptImage:
    """One image of the last prefill: its batch row, token layout, the sorted layout indices
    (k,) alive after the last cut, and its token grids (:func:`layout_views`)."""

    sample: int
    layout: ImageLayout
    kept: torch.Tensor
    views: tuple[KeptView, ...]

    @property
    def n_kept(self) -> int:
        """Tokens of this image alive after the last cut (newline / prefix tokens included)."""
        return int(self.kept.numel())

    @property
    def n_tokens(self) -> int:
        """Tokens of this image in the prompt."""
        return self.layout.num_tokens

    def pixel_masks(self, width: int, height: int, fit: str = "stretch") -> dict[str, torch.Tensor]:
        """Per view name, :meth:`KeptView.pixel_mask` over a ``width`` × ``height`` image."""
        return {view.name: view.pixel_mask(width, height, fit) for view in self.views}


def fit_box(width: int, height: int, fit: str) -> tuple[float, float, float, float]:
    """(left, top, right, bottom), in pixels of a ``width`` × ``height`` image, of the region a
    token grid covers under ``fit``."""
    if fit not in FITS:
        raise ValueError(f"`fit` must be one of {', '.join(FITS)}, got {fit!r}")
    if fit == "stretch":
        return 0.0, 0.0, float(width), float(height)
    side = min(width, height) if fit == "crop" else max(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def _cells(n_pixels: int, start: float, stop: float, n_cells: int,
           device: torch.device) -> torch.Tensor:
    """(n_pixels,) grid cell under each pixel centre along one axis, -1 outside the grid."""
    centres = torch.arange(n_pixels, device=device, dtype=torch.float64) + 0.5
    cells = ((centres - start) * n_cells / (stop - start)).floor().long()
    return torch.where((cells >= 0) & (cells < n_cells), cells, -1)


def layout_views(layout: ImageLayout) -> list[tuple[str, torch.Tensor]]:
    """The token grids of ``layout``: (name, (rows, cols) layout index of each cell).

    Main grid(s) first (``frames`` of them after the prefix), then the LLaVA-NeXT high-res canvas,
    whose row r starts at ``prefix + grid_tokens + r·(cols + newline)``.
    """
    rows, cols = layout.grid
    cells = torch.arange(rows * cols).view(rows, cols)
    if layout.frames > 1:
        names = [f"frame {t}" for t in range(layout.frames)]
    else:
        names = ["thumbnail" if layout.highres is not None else "image"]
    views = [(name, layout.prefix + t * rows * cols + cells) for t, name in enumerate(names)]
    if layout.highres is not None:
        height, width = layout.highres
        stride = width + int(layout.newline)
        start = layout.prefix + layout.grid_tokens
        canvas = start + torch.arange(height)[:, None] * stride + torch.arange(width)[None, :]
        views.append(("high-res", canvas))
    return views


def kept_image(layout: ImageLayout, kept: torch.Tensor, sample: int = 0) -> KeptImage:
    """The :class:`KeptImage` of one image whose layout indices ``kept`` (k,) survived."""
    kept = kept.sort().values
    alive = torch.zeros(layout.num_tokens, dtype=torch.bool, device=kept.device)
    alive[kept] = True
    views = tuple(
        KeptView(name, tokens.to(kept.device), alive[tokens.to(kept.device)])
        for name, tokens in layout_views(layout)
    )
    return KeptImage(sample, layout, kept, views)


def kept_images(handle: PatchHandle) -> list[KeptImage]:
    """Per image of ``handle``'s last prefill in the calling thread (prompt order), the tokens
    alive after its last cut; empty before the first prefill and after one without images."""
    record = handle._vision.last
    if record is None:
        return []
    prompt_image = _prompt_image_mask(record)
    alive = _alive_prompt_rows(record) & prompt_image
    layouts, positions, sample = _images(handle.adapter, record, prompt_image)
    return [
        kept_image(layout, alive[s, pos].nonzero()[:, 0], s)
        for layout, pos, s in zip(layouts, positions, sample)
    ]


def _prompt_image_mask(record: PrefillRecord) -> torch.Tensor:
    """(B, L) bool over the prompt: its image placeholders. The vision-side cut drops image rows
    only, so they are the dropped rows and the image rows the language model got."""
    image = ~record.keep
    rows, cols = (record.is_image & record.valid).nonzero(as_tuple=True)
    image[rows, record.index[rows, cols]] = True
    return image


def _alive_prompt_rows(record: PrefillRecord) -> torch.Tensor:
    """(B, L) bool over the prompt: rows that reach the last decoder layer (the language
    model's input rows, narrowed by the decoder cut's last surviving rows if it cut)."""
    positions, live = record.index, record.valid
    state = record.decoder
    if state is not None:
        positions, live = positions.gather(1, state.index), state.valid
    alive = torch.zeros_like(record.keep)
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
    alive[rows.expand_as(positions)[live], positions[live]] = True
    return alive


def _images(
    adapter: Adapter, record: PrefillRecord, prompt_image: torch.Tensor
) -> tuple[list[ImageLayout], list[torch.Tensor], list[int]]:
    """Per image of the prefill (row by row): its layout, prompt positions (N_i,) and batch
    row; rows ``generate`` repeated (beams) repeat their prompt's images."""
    ids = record.input_ids if record.input_ids is not None else prompt_image
    images = record.encode.images if record.encode is not None else None
    repeat, layouts = prompt_layouts(adapter, prompt_image, ids, record.layout_inputs, images)
    positions, sample = split_images(prompt_image[::repeat], layouts)
    out: tuple[list, list, list] = ([], [], [])
    for row in range(prompt_image.shape[0]):
        for layout, pos, s in zip(layouts, positions, sample):
            if s == row // repeat:
                out[0].append(layout)
                out[1].append(pos)
                out[2].append(row)
    return out


def processor_fit(image_processor: Any) -> str:
    """How ``image_processor`` lays an image onto the main token grid (see :data:`FITS`):
    AnyRes (``image_grid_pinpoints``) and processors that neither crop nor pad stretch; a
    processor that pads to a square (``do_pad`` without pinpoints) pads; one that resizes the
    shortest edge and centre-crops a square of that size crops. Other crops raise ``ValueError``
    (pass ``fit`` yourself)."""
    if getattr(image_processor, "image_grid_pinpoints", None):
        return "stretch"
    if getattr(image_processor, "do_pad", False):
        return "pad"
    if not getattr(image_processor, "do_center_crop", False):
        return "stretch"
    size, crop = image_processor.size, image_processor.crop_size
    shortest = _get(size, "shortest_edge")
    if shortest is not None and _get(crop, "height") == _get(crop, "width") == shortest:
        return "crop"
    raise ValueError(
        f"{type(image_processor).__name__} crops {crop} after resizing to {size}: pass `fit`"
    )


def _get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)
