"""Prompts of the ``vlprune`` lmms-eval model: a request's text and images in prompt order.

With a chat template (the checkpoint's, or ``chat_template=``) the prompt is one user turn
holding the images and text segments; without one it is plain: each image's placeholder, a
newline after leading images, the task text as given.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import ProcessorMixin

__all__ = ["IMAGE_MARK", "build_prompt", "prompt_segments", "truncate_at"]

IMAGE_MARK = "<image>"
"""Where a task's prompt text places an image (lmms-eval convention)."""

_QWEN_IMAGE = "<|vision_start|>{}<|vision_end|>"
_PLAIN_IMAGE = {
    "llava": "{}",
    "llava_next": "{}",
    "qwen2_vl": _QWEN_IMAGE,
    "qwen2_5_vl": _QWEN_IMAGE,
    "qwen3_vl": _QWEN_IMAGE,
    "qwen3_vl_moe": _QWEN_IMAGE,
    "llava_onevision": "{}",
    "qwen3_5": _QWEN_IMAGE,
}
"""Plain-prompt image placeholder per family; ``{}`` is the processor's ``image_token``."""


def prompt_segments(context: str, n_images: int) -> list[str | None]:
    """The request as text segments and images (``None``), in prompt order.

    The first ``n_images`` ``<image>`` marks in ``context`` become images, images without a mark
    come first, surplus marks are dropped, empty text segments are left out.
    """
    parts = context.split(IMAGE_MARK)
    inline = min(len(parts) - 1, n_images)
    parts = [*parts[:inline], "".join(parts[inline:])]
    segments: list[str | None] = [None] * (n_images - inline)
    for i, part in enumerate(parts):
        if i:
            segments.append(None)
        if part:
            segments.append(part)
    return segments


def build_prompt(processor: ProcessorMixin, family: str, context: str, n_images: int) -> str:
    """The prompt of one request: the processor's chat template if it has one, else plain.

    Template: one user turn whose content lists the images and text segments in order, plus the
    generation prompt. Plain (no template): each image's placeholder (``<image>`` for LLaVA,
    ``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen) in place, leading images each
    followed by a newline, text as given; no role markers.
    """
    segments = prompt_segments(context, n_images)
    if getattr(processor, "chat_template", None):
        content = [
            {"type": "image"} if seg is None else {"type": "text", "text": seg.strip()}
            for seg in segments
            if seg is None or seg.strip()
        ]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    placeholder = _PLAIN_IMAGE[family].format(processor.image_token)
    leading = next((i for i, seg in enumerate(segments) if seg is not None), len(segments))
    return "".join(
        seg if seg is not None else placeholder + ("\n" if i < leading else "")
        for i, seg in enumerate(segments)
    )


def truncate_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
