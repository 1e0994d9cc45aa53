"""Accuracy of the toy LLaVA on the synthetic QA, unpruned and under every pruning method.

Scoring: every answer is one word of the vocabulary, so the model's answer is its greedy next
token after the prompt (``argmax`` over the whole vocabulary of the last prompt position's
logits, which is what ``generate(max_new_tokens=1)`` returns), and a sample is correct when that
token is the answer (exact match). One prefill per sample, no decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlprune.eval.toy.data import QASample
from vlprune.eval.toy.model import prompt

__all__ = ["accuracy", "model_inputs", "predict"]


def model_inputs(processor: LlavaProcessor, batch: Sequence[QASample]) -> dict[str, torch.Tensor]:
    """Left-padded prompts + pixels of ``batch``, with position ids that skip the padding (as
    ``generate`` builds them), so a sample's answer does not depend on its batch."""
    inputs = processor(
        text=[prompt(s.question) for s in batch],
        images=[s.image for s in batch],
        padding=True,
        return_tensors="pt",
    )
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return {**inputs, "position_ids": positions}


@torch.no_grad()
def predict(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[QASample],
    *,
    batch_size: int = 16,
) -> list[str]:
    """The model's one-word answer to each sample (greedy next token)."""
    words: list[str] = []
    for start in range(0, len(samples), batch_size):
        inputs = model_inputs(processor, samples[start : start + batch_size])
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        words.extend(processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist()))
    return words


def accuracy(answers: Sequence[str], samples: Sequence[QASample]) -> float:
    """Exact-match accuracy of ``answers`` against the samples' answers, in [0, 1]."""
    if len(answers) != len(samples):
        raise ValueError(f"{len(answers)} answers for {len(samples)} samples")
    return sum(a == s.answer for a, s in zip(answers, samples)) / max(len(samples), 1)
