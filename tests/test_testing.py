"""Tests for the tiny offline models, processors and inputs in ``vlprune.testing``."""

from __future__ import annotations

import pytest
import torch
from transformers import BatchFeature, PreTrainedModel

from tests.helpers import cached_model
from vlprune.adapters import ADAPTERS, get_adapter
from vlprune.testing import (
    DEFAULT_IMAGE_SIZE,
    FAMILIES,
    SPECIAL_TOKENS,
    tiny_config,
    tiny_image,
    tiny_inputs,
    tiny_model,
    tiny_processor,
    tiny_prompt,
    tiny_tokenizer,
)

# Visual tokens per image for the default image size, and the image-feature input keys.
EXPECTED_VISUAL_TOKENS = {"llava": 36, "llava_next": 140, "qwen2_vl": 24, "qwen2_5_vl": 24,
                          "qwen3_vl": 24, "qwen3_vl_moe": 24, "llava_onevision": 140,
                          "qwen3_5": 24}
IMAGE_KEYS = {
    "llava": ("pixel_values",),
    "llava_next": ("pixel_values", "image_sizes"),
    "qwen2_vl": ("pixel_values", "image_grid_thw"),
    "qwen2_5_vl": ("pixel_values", "image_grid_thw"),
    "qwen3_vl": ("pixel_values", "image_grid_thw"),
    "qwen3_vl_moe": ("pixel_values", "image_grid_thw"),
    "llava_onevision": ("pixel_values", "image_sizes", "batch_num_images"),
    "qwen3_5": ("pixel_values", "image_grid_thw"),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def models(family: str) -> dict[str, PreTrainedModel]:
    return {impl: cached_model(family, impl) for impl in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def inputs(family: str) -> BatchFeature:
    return tiny_inputs(family, batch=2)


def _image_feature_counts(model: PreTrainedModel, family: str, inputs: BatchFeature) -> list[int]:
    with torch.no_grad():
        out = model.model.get_image_features(**{k: inputs[k] for k in IMAGE_KEYS[family]})
    return [feat.shape[0] for feat in out.pooler_output]


def test_tokenizer_vocab_and_specials() -> None:
    tok = tiny_tokenizer()
    assert tok.padding_side == "left"
    n_special = len(SPECIAL_TOKENS)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(n_special))
    assert tok("w0 w999")["input_ids"] == [n_special, n_special + 999]
    assert tok("<|vision_start|><|image_pad|><|image_pad|>")["input_ids"] == [5, 7, 7]


def test_config_ids_match_tokenizer(family: str) -> None:
    tok = tiny_tokenizer()
    cfg = tiny_config(family, num_hidden_layers=6)
    text = cfg.text_config
    assert text.num_hidden_layers == 6
    assert text.vocab_size >= len(tok)
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (64, 4, 2)
    assert text.pad_token_id == tok.pad_token_id
    assert text.eos_token_id == tok.eos_token_id
    image_token = "<image>" if family.startswith("llava") else "<|image_pad|>"
    assert cfg.image_token_id == tok.convert_tokens_to_ids(image_token)
    if family.startswith("qwen"):
        assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
        assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
        assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
        head_dim = text.hidden_size // text.num_attention_heads
        rotary = head_dim * text.rope_parameters.get("partial_rotary_factor", 1.0)
        assert sum(text.rope_parameters["mrope_section"]) == rotary // 2


def test_prompt_and_image_are_deterministic(family: str) -> None:
    prompt = tiny_prompt(family, 7, seed=3)
    assert prompt == tiny_prompt(family, 7, seed=3)
    assert len([w for w in prompt.split() if w.startswith("w")]) == 7
    image_token = "<image>" if family.startswith("llava") else "<|image_pad|>"
    assert prompt.count(image_token) == 1
    assert tiny_image(1, (30, 20)).size == (30, 20)
    assert tiny_image(1).tobytes() == tiny_image(1).tobytes() != tiny_image(2).tobytes()


def test_inputs_left_padded_with_expected_keys(family: str, inputs: BatchFeature) -> None:
    expected = {"input_ids", "attention_mask", *IMAGE_KEYS[family]}
    if family.startswith("qwen"):
        expected.add("mm_token_type_ids")
    assert set(inputs) == expected
    mask = inputs["attention_mask"]
    assert mask[:, -1].all()
    assert not mask[0, 0]  # sample 0 (5 words) is shorter than sample 1 (9 words)
    assert (inputs["input_ids"][mask == 0] == tiny_tokenizer().pad_token_id).all()
    image_token_id = tiny_config(family).image_token_id
    counts = (inputs["input_ids"] == image_token_id).sum(1).tolist()
    assert counts == [EXPECTED_VISUAL_TOKENS[family]] * 2
    assert mask.sum(1).tolist()[1] - mask.sum(1).tolist()[0] == 4


def test_placeholders_match_image_features(family: str, models: dict[str, PreTrainedModel]) -> None:
    sizes = [DEFAULT_IMAGE_SIZE[family], (100, 220), (84, 84)]
    inputs = tiny_inputs(family, batch=3, image_sizes=sizes, seed=5)
    counts = (inputs["input_ids"] == models["sdpa"].config.image_token_id).sum(1).tolist()
    assert counts == _image_feature_counts(models["sdpa"], family, inputs)
    assert counts[0] == EXPECTED_VISUAL_TOKENS[family]


def test_forward_sdpa_matches_eager(
    family: str, models: dict[str, PreTrainedModel], inputs: BatchFeature
) -> None:
    with torch.no_grad():
        logits = {impl: model(**inputs).logits for impl, model in models.items()}
    batch, length = inputs["input_ids"].shape
    assert logits["sdpa"].shape == (batch, length, tiny_config(family).text_config.vocab_size)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits["sdpa"][real], logits["eager"][real], atol=1e-5, rtol=0)


def test_generate(family: str, models: dict[str, PreTrainedModel], inputs: BatchFeature) -> None:
    out = models["sdpa"].generate(**inputs, max_new_tokens=8, do_sample=False)
    length = inputs["input_ids"].shape[1]
    assert out.shape[0] == 2
    assert length < out.shape[1] <= length + 8
    assert torch.equal(out[:, :length], inputs["input_ids"])


def test_same_seed_same_weights(family: str) -> None:
    a, b, c = tiny_model(family), tiny_model(family), tiny_model(family, seed=1)
    state_b, state_c = b.state_dict(), c.state_dict()
    assert all(torch.equal(v, state_b[k]) for k, v in a.state_dict().items())
    assert not all(torch.equal(v, state_c[k]) for k, v in a.state_dict().items())
    assert next(a.parameters()).dtype == torch.float32
    assert not a.training
    gen, tok = a.generation_config, tiny_tokenizer()
    assert (gen.pad_token_id, gen.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)


def test_processor_class_has_no_video(family: str) -> None:
    processor = tiny_processor(family)
    assert processor.tokenizer.padding_side == "left"
    assert getattr(processor, "video_processor", None) is None


def test_every_adapter_family_has_a_tiny_model() -> None:
    """A new adapter family joins every family-parametrised test through FAMILIES."""
    assert sorted(FAMILIES) == sorted(adapter.family for adapter in ADAPTERS)
    for family in FAMILIES:
        assert get_adapter(tiny_model(family)).family == family


def test_package_keeps_its_import_path() -> None:
    """``vlprune.testing`` is a package (configs, processors, inputs) that re-exports every
    public name from the module defining it."""
    import vlprune.testing as testing
    from vlprune.testing import configs, inputs, processors

    for name in testing.__all__:
        assert any(getattr(module, name, None) is getattr(testing, name)
                   for module in (configs, processors, inputs)), name
