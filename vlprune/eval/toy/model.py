"""The toy LLaVA: real transformers classes at toy width, with LLaVA-1.5's token geometry.

``LlavaForConditionalGeneration`` = CLIP ViT (336 px, patch 14 → 24×24 = 576 patch tokens + CLS;
4 layers, hidden 64) → 2-layer GELU projector → Llama (4 layers, hidden 128, GQA 4/2 heads),
features from the penultimate ViT layer with CLS dropped (``vision_feature_layer=-2``,
``"default"`` strategy), exactly as LLaVA-1.5. The processor is a real ``LlavaProcessor``:
``CLIPImageProcessorPil`` (no torchvision) and an offline word-level tokenizer over the fixed
word list ``WORDS`` (every question and answer word of :mod:`vlprune.eval.toy.data`).

The trained weights ship in ``CHECKPOINT_DIR`` (``save_pretrained`` format, float16 on disk) and
load offline with :func:`load_toy_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vlprune.eval.toy.data import (
    ANSWERS,
    COLORS,
    IMAGE_SIZE,
    PAIR_WORDS,
    PLURALS,
    SHAPES,
)

__all__ = [
    "CHAT_TEMPLATE",
    "CHECKPOINT_DIR",
    "PATCH_SIZE",
    "SPECIALS",
    "WORDS",
    "answer_ids",
    "load_toy_model",
    "prompt",
    "toy_config",
    "toy_model",
    "toy_processor",
    "toy_tokenizer",
]

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"
CHAT_TEMPLATE = (
    "{{- '<s>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- ' user :' -}}"
    "{%- if message['content'] is string -%}{{- ' ' + message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- ' <image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- ' ' + part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' assistant :' -}}"
    "{%- if message['content'] is string -%}{{- ' ' + message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- ' ' + part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{- ' </s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' assistant :' -}}{%- endif -%}"
)
"""The trained prompt format as a chat template: ``<s> user : <image> question assistant :``
(:func:`prompt`), an assistant turn ``assistant : subject answer </s>``; shipped with the
checkpoint (``chat_template.jinja``), so lmms-eval and ``apply_chat_template`` prompt the model
as it was trained."""
PATCH_SIZE = 14
SPECIALS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
_QUESTION_WORDS = (
    "user", "assistant", ":", "?", "what", "color", "is", "the", "how", "many", "are", "there",
    "a", "an", "or", "on",
)
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        (*_QUESTION_WORDS, *SHAPES, *PLURALS.values(), *COLORS, *PAIR_WORDS, *ANSWERS)
    )
)
VISION = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
}
TEXT = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


def _vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate((*SPECIALS, *WORDS))}


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``SPECIALS`` + ``WORDS`` (whitespace split, left padding)."""
    backend = Tokenizer(models.WordLevel(vocab=_vocab(), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
        padding_side="left",
    )


def toy_processor() -> LlavaProcessor:
    """``LlavaProcessor`` whose 576 ``<image>`` placeholders match :func:`toy_model`, with the
    trained prompt format as its chat template (:data:`CHAT_TEMPLATE`)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=toy_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def toy_config() -> LlavaConfig:
    """LLaVA-1.5-shaped config at toy width (see the module docstring)."""
    vocab = _vocab()
    special = {
        "pad_token_id": vocab["<pad>"], "bos_token_id": vocab["<s>"], "eos_token_id": vocab["</s>"]
    }
    text = LlamaConfig(vocab_size=len(vocab), **TEXT, **special)
    side = IMAGE_SIZE // PATCH_SIZE
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=text,
        image_token_id=vocab["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=side * side,
        **special,
    )


def toy_model(seed: int = 0) -> LlavaForConditionalGeneration:
    """Freshly initialised (untrained) float32 toy LLaVA; equal ``seed`` → equal weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(
            toy_config(), attn_implementation="sdpa", dtype=torch.float32
        )
    return model


def load_toy_model(path: str | Path = CHECKPOINT_DIR) -> LlavaForConditionalGeneration:
    """The trained toy LLaVA from ``path`` (default: the shipped checkpoint), float32, eval mode,
    sdpa attention; offline."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no toy checkpoint in {path}; train one with `python -m vlprune.eval.toy.train`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    )
    return model.eval()


def prompt(question: str, subject: str | None = None) -> str:
    """The single-turn prompt; with the question's ``subject`` word (the reply's first word,
    :mod:`~vlprune.eval.toy.data`) the next token is the one-word answer."""
    reply = "" if subject is None else f" {subject}"
    return f"<s> user : <image> {question} assistant :{reply}"


def answer_ids(tokenizer: PreTrainedTokenizerFast | None = None) -> dict[str, int]:
    """Token id of every answer word in ``ANSWERS``."""
    vocab = _vocab() if tokenizer is None else tokenizer.get_vocab()
    return {a: vocab[a] for a in ANSWERS}
