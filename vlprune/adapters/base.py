"""What one model family looks like: module paths, image token id and per-image token layout.

An adapter is a short table of facts plus the lookups that need the model's inputs (the token
layout of each image). It never decides what to keep.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vlprune.hooks.signals import ModuleInputProbe, TextAttentionProbe, VisionAttentionProbe


@dataclass(frozen=True)
class ImageLayout:
    """Token layout of one image inside the language model's input.

    Tokens are ordered ``[prefix | grid rows*cols | high-res part]``:

    - ``grid``: (rows, cols) of the main grid: the whole image for LLaVA-1.5, the thumbnail
      (base crop) for LLaVA-NeXT, the merged-patch grid of one frame for Qwen2-VL/2.5-VL
      (``frames`` grids follow each other).
    - LLaVA-NeXT / LLaVA-OneVision only: ``crop_grid`` (crops high, crops wide), ``highres``
      (rows, cols) of the unpadded high-res canvas, ``highres_offset`` (top, left) of that canvas
      inside the padded ``crop_grid * grid`` canvas, and ``newline``: one learned newline token
      ends every high-res row.
    - LLaVA-OneVision only: ``highres_source`` (rows, cols) of the unpadded canvas *before* the
      ``anyres_max_N`` bilinear downsampling when it applied (``highres`` is then the smaller
      token canvas), else None; ``suffix``: tokens after the grid that belong to no cell (the
      newline closing a thumbnail-only image of a multi-image prompt).
    """

    num_tokens: int
    grid: tuple[int, int]
    frames: int = 1
    prefix: int = 0
    crop_grid: tuple[int, int] | None = None
    highres: tuple[int, int] | None = None
    highres_offset: tuple[int, int] = (0, 0)
    newline: bool = False
    highres_source: tuple[int, int] | None = None
    suffix: int = 0

    @property
    def grid_tokens(self) -> int:
        """Tokens in the main grid(s): rows * cols * frames."""
        return self.grid[0] * self.grid[1] * self.frames


def checked_token_count(
    layouts: list[ImageLayout], n_image_tokens: int, source: str = "image layouts give"
) -> list[ImageLayout]:
    """``layouts``, after checking that they hold the prompt's ``n_image_tokens`` placeholders
    (``ValueError`` naming ``source`` otherwise)."""
    total = sum(layout.num_tokens for layout in layouts)
    if total != n_image_tokens:
        raise ValueError(
            f"{source} {total} tokens but the prompt has {n_image_tokens} placeholders"
        )
    return layouts


def checked_crop_count(layouts: list[ImageLayout], n_sequences: int) -> list[ImageLayout]:
    """``layouts`` of AnyRes images, after checking that their sequences (thumbnail + crops, or
    one for an image without ``crop_grid``) are the ``n_sequences`` the vision encoder saw."""
    crops = sum(1 + lay.crop_grid[0] * lay.crop_grid[1] if lay.crop_grid else 1
                for lay in layouts)
    if crops != n_sequences:
        raise ValueError(
            f"image_sizes give {crops} crops but the vision encoder saw {n_sequences}"
        )
    return layouts


class Adapter:
    """Base adapter: resolves module paths of a ``*ForConditionalGeneration`` VLM.

    Subclasses set the class attributes and implement :meth:`image_layouts`.
    """

    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]
    rope: ClassVar[str]  # "1d" (LLaMA/Vicuna, OneVision's Qwen2) or "mrope" (Qwen 3-D positions)
    has_cls: ClassVar[bool]
    packed_vision: ClassVar[bool] = False  # True: Qwen-style packed rows, 2x2 merged tokens
    vision_path: ClassVar[str]
    vision_layers_path: ClassVar[str]
    projector_path: ClassVar[str]

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _resolve(self, path: str) -> nn.Module:
        module: Any = self.model
        for part in path.split("."):
            if not hasattr(module, part):
                raise AttributeError(
                    f"{type(self.model).__name__} has no module {path!r} (missing {part!r}); "
                    f"the {self.family} adapter does not match this transformers version"
                )
            module = getattr(module, part)
        return module

    @property
    def base(self) -> nn.Module:
        """The multimodal base model (``model.model``): merges image features into the text."""
        return self._resolve("model")

    @property
    def language_model(self) -> nn.Module:
        """The decoder-only language model (no LM head)."""
        return self._resolve("model.language_model")

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """Decoder layers of the language model."""
        return self._resolve("model.language_model.layers")

    @property
    def rotary_embedding(self) -> nn.Module:
        """The language model's rotary embedding: ``(x, position_ids) -> (cos, sin)``."""
        return self._resolve("model.language_model.rotary_emb")

    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder."""
        return self._resolve(self.vision_path)

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision encoder's transformer layers."""
        return self._resolve(self.vision_layers_path)

    @property
    def projector(self) -> nn.Module:
        """The projector / patch merger that maps vision features to the text hidden size."""
        return self._resolve(self.projector_path)

    def vision_probe(self, layer: int) -> VisionAttentionProbe:
        """An attention probe on vision-encoder layer ``layer`` (not yet installed)."""
        raise NotImplementedError

    def text_probe(self, layer: int) -> TextAttentionProbe:
        """An attention probe on decoder layer ``layer``'s self-attention (not yet installed)."""
        return TextAttentionProbe(self.decoder_layers[layer].self_attn)

    @property
    def recurrent_layers(self) -> frozenset[int]:
        """Decoder layers without self-attention (linear attention / recurrent token mixers,
        Qwen3.5's Gated DeltaNet): no attention map, a recurrent state instead of a KV cache."""
        return frozenset()

    def check_attention_layers(self, layers: list[int]) -> None:
        """``ValueError`` if a method needs the attention of a recurrent decoder layer."""
        bad = sorted(set(layers) & self.recurrent_layers)
        if bad:
            full = [i for i in range(len(self.decoder_layers)) if i not in self.recurrent_layers]
            raise ValueError(
                f"decoder layer(s) {bad} of this {self.family} model are linear-attention layers "
                f"without attention maps; the method needs full-attention layers: {full}"
            )

    def projector_probe(self) -> ModuleInputProbe:
        """Captures the projector / merger input: vision features before projection."""
        return ModuleInputProbe(self.projector, vision=True)

    @property
    def deepstack_mergers(self) -> list[nn.Module]:
        """Qwen3-VL DeepStack mergers: projectors of intermediate vision layers whose outputs
        are added to the language model's hidden states at the image positions; empty for
        families without DeepStack."""
        return []

    @property
    def image_token_id(self) -> int:
        """Token id of the image placeholders in ``input_ids``."""
        return int(self.model.config.image_token_id)

    def image_layouts(
        self, inputs: Mapping[str, Any], n_image_tokens: int
    ) -> list[ImageLayout]:
        """Layouts of the images of one forward, in the order their placeholders appear.

        ``inputs`` holds the multimodal base model's keyword inputs (``image_sizes``,
        ``image_grid_thw``, ...); ``n_image_tokens`` is the number of placeholders in the batch.
        """
        raise NotImplementedError

    @property
    def vision_output_layer(self) -> int:
        """Last vision-encoder layer (0-based) whose output reaches the projector: the one that
        produces ``hidden_states[config.vision_feature_layer]`` (the earliest if several), else
        the last layer. Rows cut after a later layer would not change the image features."""
        n_layers = len(self.vision_layers)
        layer = getattr(self.model.config, "vision_feature_layer", -1)
        layers = layer if isinstance(layer, (list, tuple)) else [layer]
        return min(int(i) % (n_layers + 1) for i in layers) - 1

    def encoder_layouts(self, inputs: Mapping[str, Any], n_sequences: int) -> list[ImageLayout]:
        """Layouts of the images of one image-encoder forward, in prompt order, from the
        keyword inputs of ``get_image_features`` (``image_sizes``, ``image_grid_thw``) alone.

        ``n_sequences``: how many sequences the encoder's first layer saw (batched encoders:
        one per CLIP crop; packed encoders: rows). Each image is ``1 + crops`` sequences
        (LLaVA-NeXT), one (LLaVA-1.5) or ``frames`` ``cu_seqlens`` segments (Qwen).
        """
        raise NotImplementedError

    def vision_unit_tokens(self, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """Packed encoders (Qwen): (S,) LongTensor, the merged LM token (raster order, counted
        over all images) of each pre-merge row in the encoder's row order. ``None`` for
        batched encoders (CLIP: row ``1 + p`` of a crop is its raster patch ``p``)."""
        return None

    @staticmethod
    def _as_list(value: Any) -> list[list[int]]:
        if isinstance(value, torch.Tensor):
            return value.tolist()
        return [list(v) for v in value]
