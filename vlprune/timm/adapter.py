"""What a timm ``VisionTransformer`` looks like to vlprune: blocks, prefix tokens, token grid.

A timm ViT runs one sequence per image, ``[CLS?] [registers / distillation token] [patches]``
(``num_prefix_tokens`` prefix rows, then the patch grid in raster order), through
``model.blocks``. The adapter states those facts and makes the attention probes; the methods
see the blocks up to the cut block as "the vision encoder", so their official layer choices
(negative indices, depth-scaled layers) resolve inside it. There is no language model:
everything a vision-language adapter exposes about one raises :class:`NoLanguageModelError`.

Nothing here imports timm at module level: vlprune must import in environments without it.
"""

from __future__ import annotations

from typing import Any, NoReturn

from torch import nn

from vlprune.adapters.base import Adapter
from vlprune.timm.probes import PatchGridProbe, TimmAttentionProbe

FAMILY = "timm"


class NoLanguageModelError(ValueError):
    """A method asked a timm ViT for a part only vision-language models have."""


def is_timm_model(model: Any) -> bool:
    """True for any model class defined by timm (checked by module name: timm stays unimported
    when it is not installed)."""
    return any(cls.__module__.split(".")[0] == "timm" for cls in type(model).__mro__)


def check_supported(model: nn.Module) -> None:
    """``TypeError`` naming why, unless ``model`` is a timm ``VisionTransformer`` (or subclass)
    whose pooling works on any number of tokens."""
    from timm.models.vision_transformer import VisionTransformer

    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"vlprune cannot patch timm {name}: {_unsupported_reason(model)}; supported: timm "
            "VisionTransformer models and subclasses (class token or not, register tokens, "
            "token / avg / max / map pooling)"
        )
    pool = getattr(model, "attn_pool", None)
    if getattr(pool, "pos_embed", None) is not None:
        raise TypeError(
            f"vlprune cannot patch this timm {name}: its attention pooling adds a position "
            "embedding per token, so it needs every token"
        )


def _unsupported_reason(model: nn.Module) -> str:
    attention = any("attention" in type(m).__name__.lower() for m in model.modules())
    if not attention:
        return "it is convolutional, there are no tokens to drop"
    if hasattr(model, "stages") or hasattr(model, "layers"):
        return ("it is hierarchical, patch merging between stages changes the token grid, so "
                "a kept-token set cannot follow it")
    return "it is not a VisionTransformer (one grid of patch tokens after the prefix tokens)"


class TimmViTAdapter(Adapter):
    """Facts of one timm ``VisionTransformer`` patched with a cut after block ``cut_block``.

    ``has_cls``: the model has a class token (row 0); ``prefix``: all prefix rows (class,
    register and distillation tokens); ``vision_layers``: ``blocks[:cut_block + 1]``, the
    encoder the methods see; ``vision_output_layer``: ``cut_block``.
    """

    family = FAMILY
    model_classes = ("VisionTransformer",)
    rope = "none"

    def __init__(self, model: nn.Module, cut_block: int | None = None) -> None:
        super().__init__(model)
        self.depth = len(model.blocks)
        self.cut_block = resolve_cut_block(cut_block, self.depth)
        self.has_cls = bool(model.has_class_token)
        self.prefix = int(model.num_prefix_tokens)

    @property
    def blocks(self) -> nn.Sequential:
        """Every block of the model."""
        return self.model.blocks

    @property
    def vision_tower(self) -> nn.Module:
        """The ViT itself."""
        return self.model

    @property
    def vision_layers(self) -> nn.Sequential:
        """The blocks up to and including the cut block."""
        return self.model.blocks[: self.cut_block + 1]

    @property
    def vision_output_layer(self) -> int:
        """The cut block: the last block whose output a method may cut."""
        return self.cut_block

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the patch grid of an image of ``image_size`` (height, width)."""
        embed = self.model.patch_embed
        if hasattr(embed, "dynamic_feat_size"):
            return tuple(embed.dynamic_feat_size(tuple(image_size)))
        return tuple(embed.grid_size)

    def vision_probe(self, layer: int) -> TimmAttentionProbe:
        """Attention probe of block ``layer`` (``TypeError`` unless it is timm's ``Block`` or
        ``ResPostBlock`` with timm's fused-qkv ``Attention``)."""
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, ResPostBlock

        block = self.model.blocks[layer]
        attn = getattr(block, "attn", None)
        if type(block) not in (Block, ResPostBlock) or type(attn) is not Attention:
            found = f"{type(block).__name__} with {type(attn).__name__ if attn else 'no `attn`'}"
            raise TypeError(
                f"block {layer} of this timm {type(self.model).__name__} is a {found}, not "
                "timm's Block / ResPostBlock with its fused-qkv Attention: attention-based "
                "methods cannot read it (random and uniform still work)"
            )
        return TimmAttentionProbe(block, pre_norm=type(block) is Block, has_cls=self.has_cls,
                                  prefix=self.prefix)

    def patch_token_probe(self) -> PatchGridProbe:
        """Patch → token map of a ViT: every patch is its own token (raster, image by image)."""
        return PatchGridProbe(self.model.blocks[0], prefix=self.prefix)

    def _no_language_model(self, part: str) -> NoReturn:
        raise NoLanguageModelError(
            f"a timm {type(self.model).__name__} has no language model (asked for its {part})"
        )

    @property
    def base(self) -> nn.Module:
        """No multimodal base model: :class:`NoLanguageModelError`."""
        self._no_language_model("multimodal base model")

    @property
    def language_model(self) -> nn.Module:
        """No language model: :class:`NoLanguageModelError`."""
        self._no_language_model("language model")

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """No decoder layers: :class:`NoLanguageModelError`."""
        self._no_language_model("decoder layers")

    @property
    def projector(self) -> nn.Module:
        """No projector: :class:`NoLanguageModelError`."""
        self._no_language_model("projector")

    @property
    def image_token_id(self) -> int:
        """No image placeholders: :class:`NoLanguageModelError`."""
        self._no_language_model("image token id")

    def text_probe(self, layer: int) -> NoReturn:
        """No decoder: :class:`NoLanguageModelError`."""
        self._no_language_model(f"decoder layer {layer}")

    def projector_probe(self) -> NoReturn:
        """No projector: :class:`NoLanguageModelError`."""
        self._no_language_model("projector input")


def resolve_cut_block(cut_block: int | None, depth: int) -> int:
    """0-based cut block (negative counts from the end; None: the last block)."""
    if cut_block is None:
        return depth - 1
    if isinstance(cut_block, bool) or not isinstance(cut_block, int):
        raise ValueError(f"`cut_block` must be an int block index or None, got {cut_block!r}")
    if not -depth <= cut_block < depth:
        raise ValueError(f"`cut_block`={cut_block} is out of range for a {depth}-block ViT")
    return cut_block % depth
