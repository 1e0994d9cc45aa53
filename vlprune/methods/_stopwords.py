"""MMTok's stop words: token-id sequences that are never text targets, and where they occur.

The word lists follow the official code (``docs/methods/mmtok.md``); :func:`mmtok_stopwords` turns
them into token ids for one tokenizer, :func:`stopword_mask` finds them in a prompt.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

STOP_WORDS: tuple[str, ...] = (
    "a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "have", "has", "had",
    "do", "does", "did", "it", "they", "he", "she", "we", "you", "i", "what", "where", "when",
    "why", "how", "who", "which", "and", "or", "but", "so", "if", "then", "question", "answer",
    "to", "for", "with", "by", "from", "at", "into", "onto", "upon",
)
"""The official "non-visual" words, matched in any case (``docs/methods/mmtok.md``)."""

PROMPT_SUFFIXES: tuple[str, ...] = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
)
"""lmms-eval answer-format suffixes the official code deletes before filtering."""

CHAT_TEMPLATE_PHRASES: tuple[str, ...] = (
    "USER:", "ASSISTANT:", "system\n", "user\n", "assistant\n", "You are a helpful assistant.",
    "[INST]", "[/INST]",
)
"""Chat-template text of LLaVA (vicuna, mistral) and Qwen prompts: never part of the question."""


def mmtok_stopwords(
    tokenizer: Any,
    *,
    words: Iterable[str] = STOP_WORDS,
    phrases: Iterable[str] = PROMPT_SUFFIXES + CHAT_TEMPLATE_PHRASES,
    punctuation: bool = True,
) -> list[list[int]]:
    """Token-id sequences that are never MMTok text targets, for ``patch(..., stopwords=...)``.

    Call once per tokenizer. Holds the tokenizer's special tokens; with ``punctuation`` every
    vocabulary token without a word character (the official ``\\b\\w+\\b`` filter); each of
    ``words`` in lower, Capitalised and UPPER case; and each of ``phrases``; words and phrases
    tokenised at the start of the text, after a space and after a newline. A single-token entry
    is dropped wherever it occurs (also as a piece of a longer word); a multi-token entry only
    where the whole sequence occurs. The official Qwen path filters nothing: ``words=()``.
    """
    out = {(i,) for i in tokenizer.all_special_ids}
    out |= {(i,) for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    if punctuation:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        out |= {(i,) for i, t in enumerate(texts) if not re.search(r"\w", t) and "\ufffd" not in t}
    variants = {v for w in words for v in (w.lower(), w.capitalize(), w.upper())}
    for text in variants | set(phrases):
        out |= _in_context(tokenizer, text)
    return [list(seq) for seq in sorted(out)]


def _in_context(tokenizer: Any, text: str) -> set[tuple[int, ...]]:
    """Token ids of ``text`` at the start, after a space and after a newline (no unknowns)."""
    found = set()
    for head_text, sep in (("", ""), ("a", " "), ("a\n", "")):
        head = tokenizer.encode(head_text, add_special_tokens=False) if head_text else []
        full = tokenizer.encode(head_text + sep + text, add_special_tokens=False)
        tail = tuple(full[len(head):])
        if full[:len(head)] == head and tail and tokenizer.unk_token_id not in tail:
            found.add(tail)
    return found


def stopword_mask(input_ids: torch.Tensor, stopwords: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, L) bool: True on tokens covered by an occurrence of any ``stopwords`` sequence."""
    hit = torch.isin(input_ids, torch.tensor(
        [s[0] for s in stopwords if len(s) == 1], dtype=input_ids.dtype, device=input_ids.device
    ))
    by_size: dict[int, list[Sequence[int]]] = {}
    for seq in stopwords:
        if 1 < len(seq) <= input_ids.shape[1]:
            by_size.setdefault(len(seq), []).append(seq)
    for size, seqs in by_size.items():
        pattern = torch.tensor(seqs, dtype=input_ids.dtype, device=input_ids.device)
        windows = input_ids.unfold(1, size, 1)  # (B, L - size + 1, size)
        start = (windows[:, :, None, :] == pattern).all(-1).any(-1)
        for offset in range(size):
            hit[:, offset:offset + start.shape[1]] |= start
    return hit

