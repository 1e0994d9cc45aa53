"""timm ViTs: the vision-stage methods on any timm ``VisionTransformer``, classifier or tower.

``vlprune.patch(model, method, budget=... | ratio=..., cut_block=None, **options)`` on a timm
``VisionTransformer`` (class token or not, register tokens, token / avg / max / map pooling,
the CLIP, SigLIP and DINOv2 configs timm ships) installs removable hooks on that instance: no
class swap, fused attention untouched, ``unpatch()`` restores it bit for bit.

- After block ``cut_block`` (default: the last) each image keeps ``budget`` patch tokens (or
  ``ratio`` of them), chosen by the method on its own; class and register tokens always stay.
  Later blocks, the final norm and the pooling see only the kept tokens: a cut before the last
  block speeds up the ViT itself, a cut after it (the default) is an output cut for a VLM tower:
  ``forward_features`` and ``forward_intermediates(output_fmt="NLC")`` return the prefix tokens
  and the kept patch tokens only (intermediates of blocks before the cut keep every token).
- Methods: ``random`` and ``uniform``; ``hiprune``, ``todre`` (stage 1) and, with a class
  token, ``hired`` and ``globalcom2`` select once after ``cut_block``, from attention of blocks
  up to it (their official layers resolve in ``blocks[:cut_block + 1]``); ``flowcut`` cuts
  progressively up to ``cut_block``. Methods that need a language model (``fastv``,
  ``transprune``, ``mmtok``) raise ``ValueError``; ``hired`` / ``globalcom2`` on a ViT without
  a class token ``TypeError``.
- ``handle.kept_indices``: (B, k) raster indices of the kept patches into the patch grid, in the
  order the output holds them; ``handle.stats`` (:class:`TimmPruneStats`) adds ``grid`` and
  ``kept_indices`` per image.

Architectures that are not a ViT over one token grid (Swin, ConvNeXt, ...) raise ``TypeError``.
"""

from vlprune.timm.adapter import TimmViTAdapter, check_supported, is_timm_model
from vlprune.timm.handle import TimmPatchHandle, TimmPruneStats, patch_timm

__all__ = [
    "TimmPatchHandle",
    "TimmPruneStats",
    "TimmViTAdapter",
    "check_supported",
    "is_timm_model",
    "patch_timm",
]
