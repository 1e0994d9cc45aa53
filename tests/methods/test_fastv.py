"""``fastv``: hand-checkable selections on planted attention, ``keep_rows``' per-row counts, and
the method on tiny models (kept counts, layer lengths, the official ranking rule end to end)."""

from __future__ import annotations

import pytest
import torch

import vlprune
from tests.helpers import attention_output_index, cached_model
from vlprune.adapters import get_adapter
from vlprune.budget import Budget
from vlprune.methods.base import DecoderBatch, keep_rows
from vlprune.methods.fastv import FastV
from vlprune.testing import FAMILIES, tiny_inputs, tiny_model


class PlantedProbe:
    """Stands in for a TextAttentionProbe: returns planted (B, H, Q, L) rows, records queries."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.planted = rows  # (B, H, L): attention of the last query
        self.queries: list[torch.Tensor] = []

    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        self.queries.append(queries.clone())
        return self.planted[:, :, None, :].expand(-1, -1, queries.shape[1], -1)


def _batch(is_image: torch.Tensor, attention: torch.Tensor) -> tuple[DecoderBatch, PlantedProbe]:
    probe = PlantedProbe(attention)
    hidden = torch.zeros(*is_image.shape, 8)
    batch = DecoderBatch(layer=2, hidden=hidden, is_image=is_image, probes={"attention": probe})
    return batch, probe


def _image_rows(length: int, visual: range) -> torch.Tensor:
    is_image = torch.zeros(length, dtype=torch.bool)
    is_image[list(visual)] = True
    return is_image


def test_keeps_text_and_most_attended_visual_rows() -> None:
    """10 rows, visual 2..7; last query attends most to 3 and 6 → keep text + {3, 6}, sorted."""
    is_image = _image_rows(10, range(2, 8))[None]
    attention = torch.full((1, 2, 10), 0.01)
    attention[0, :, 3] = 0.30
    attention[0, :, 6] = 0.25
    attention[0, 0, 5] = 0.20  # second best for k = 3
    attention[0, :, 0] = 0.9  # text rows are kept whatever their score
    batch, probe = _batch(is_image, attention)
    kept = FastV(layer=2).choose(batch, Budget(tokens=2))
    assert kept.tolist() == [[0, 1, 3, 6, 8, 9]]
    assert probe.queries[0].tolist() == [[9]]  # the last prompt position asks
    assert FastV(layer=2).choose(batch, Budget(tokens=3)).tolist() == [[0, 1, 3, 5, 6, 8, 9]]
    # ratio: ceil(0.5 * 6) = 3 visual rows
    assert FastV(layer=2).choose(batch, Budget(ratio=0.5)).tolist() == [[0, 1, 3, 5, 6, 8, 9]]


def test_ranks_by_head_mean_not_head_max() -> None:
    """Head 0 puts 0.6 on row 4 alone; both heads give rows 3 and 6 ≥ 0.3 → mean keeps 3, 6."""
    is_image = _image_rows(10, range(2, 8))[None]
    attention = torch.zeros(1, 2, 10)
    attention[0, 0, 4] = 0.6
    attention[0, 0, [3, 6]] = 0.3
    attention[0, 1, [3, 6]] = 0.4
    batch, _ = _batch(is_image, attention)
    assert FastV(layer=2).choose(batch, Budget(tokens=2)).tolist() == [[0, 1, 3, 6, 8, 9]]


def test_ties_keep_the_earlier_token() -> None:
    """Uniform attention: the first k visual rows are kept (deterministic tie-break)."""
    is_image = _image_rows(10, range(2, 8))[None]
    batch, _ = _batch(is_image, torch.full((1, 4, 10), 0.1))
    assert FastV(layer=2).choose(batch, Budget(tokens=3)).tolist() == [[0, 1, 2, 3, 4, 8, 9]]


def test_budget_above_visual_count_keeps_everything() -> None:
    """A budget ≥ the visual count keeps every row, in order."""
    is_image = _image_rows(10, range(2, 8))[None]
    batch, _ = _batch(is_image, torch.rand(1, 2, 10))
    assert FastV(layer=2).choose(batch, Budget(tokens=100)).tolist() == [list(range(10))]


def test_rows_with_different_visual_counts_keep_exactly_k_each() -> None:
    """Row 0 has 6 visual rows, row 1 has 4; k = 2 → each keeps its best 2 visual rows; the
    shorter row 0 (6 rows) is left-padded to row 1's 8 with two masked slots."""
    is_image = torch.stack([_image_rows(10, range(2, 8)), _image_rows(10, range(2, 6))])
    scores = torch.tensor([
        [9.0, 9.0, 0.1, 0.8, 0.7, 0.2, 0.9, 0.6, 9.0, 9.0],  # keeps 3 and 6
        [9.0, 9.0, 0.5, 0.1, 0.9, 0.2, 0.0, 0.0, 0.0, 0.0],  # keeps 2 and 4
    ])
    index, slots = keep_rows(scores, is_image, keep_visual=2)
    assert index.tolist() == [[0, 0, 0, 1, 3, 6, 8, 9], [0, 1, 2, 4, 6, 7, 8, 9]]
    assert slots.tolist() == [[False, False] + [True] * 6, [True] * 8]
    attention = scores[:, None, :].expand(-1, 3, -1)
    batch, _ = _batch(is_image, attention)
    chosen_index, chosen_slots = FastV(layer=2).choose(batch, Budget(tokens=2))
    assert torch.equal(chosen_index, index) and torch.equal(chosen_slots, slots)
    visual_kept = (is_image.gather(1, index) & slots).sum(1).tolist()
    assert visual_kept == [2, 2]


def test_keep_rows_is_sorted_and_keeps_text_with_low_scores() -> None:
    """Text rows survive even with the lowest scores; output ascending per row."""
    is_image = _image_rows(8, range(1, 7))[None]
    scores = torch.tensor([[-5.0, 1.0, 6.0, 2.0, 5.0, 3.0, 4.0, -9.0]])
    kept = keep_rows(scores, is_image, keep_visual=3)
    assert kept.tolist() == [[0, 2, 4, 6, 7]]


def test_probe_sits_on_layer_k_minus_one() -> None:
    """FastV(layer=K) ranks with the self-attention of decoder layer K - 1."""
    model = tiny_model("llava")
    probes = FastV(layer=3).probes(get_adapter(model))
    assert probes["attention"].attention is model.model.language_model.layers[2].self_attn
    assert FastV(layer=3).cut_layers(4) == [3]


@pytest.mark.parametrize("family", FAMILIES)
def test_real_model_counts_and_layer_lengths(family: str) -> None:
    """Tiny model, budget 5: 5 visual tokens per sample from layer 2 on; layers 0-1 see all."""
    model = cached_model(family, seed=2)
    inputs = tiny_inputs(family, batch=2)
    length = inputs["input_ids"].shape[1]
    n_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    with vlprune.patch(model, "fastv", budget=5) as handle:
        with torch.no_grad():
            logits = model(**inputs).logits
        stats = handle.stats
    short = length - n_visual + 5
    assert stats.kept_tokens == [5, 5]
    assert stats.visual_tokens == [n_visual, n_visual]
    assert stats.layer_tokens == [[length, length, short, short]] * 2
    assert logits.shape[1] == short
    assert stats.settings["layer"] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_real_model_selection_follows_eager_attention(family: str) -> None:
    """FastV == fixed_layer with the top-5 visual ordinals of eager layer-1 last-row head mean."""
    model = cached_model(family, "eager")
    inputs = tiny_inputs(family, batch=1)
    is_image = inputs["input_ids"][0] == model.config.image_token_id
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[
            attention_output_index(model, 1)]
    scores = attn[0, :, -1].mean(0)[is_image]
    top = scores.topk(6).values
    assert float(top[4] - top[5]) > 1e-7, "near-tie (fp noise is ~1e-9): pick another seed"
    ordinals = sorted(scores.topk(5).indices.tolist())
    with vlprune.patch(model, "fastv", budget=5, layer=2), torch.no_grad():
        got = model(**inputs).logits
    with vlprune.patch(model, "fixed_layer", budget=5, indices=ordinals, layer=2), torch.no_grad():
        want = model(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
