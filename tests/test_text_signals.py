"""``TextAttentionProbe`` recomputes decoder attention rows exactly as the layer computed them.

Reference: the eager attention weights transformers returns with ``output_attentions=True``
(``out.attentions[j]``, (B, H, L, L), for every family). GQA (4 query / 2 KV heads), 1-D RoPE
(LLaMA) and M-RoPE (Qwen), causal and left-padding masks (masked columns included).
"""

from __future__ import annotations

import pytest
import torch

import vlprune
from tests.helpers import attention_output_index, cached_model, vlprune_hook_count
from vlprune.adapters import get_adapter
from vlprune.hooks.signals import TextAttentionProbe
from vlprune.testing import FAMILIES, tiny_inputs

LAYERS = (0, 1, 3)


def _layers(family: str) -> tuple[int, ...]:
    """Probed layers: LAYERS, or every full-attention layer of a hybrid decoder (Qwen3.5)."""
    recurrent = get_adapter(cached_model(family, "eager", seed=1)).recurrent_layers
    return tuple(i for i in range(4) if i not in recurrent) if recurrent else LAYERS


def _queries(length: int, batch: int) -> torch.Tensor:
    """(B, 4) query rows: the last position, then a few others (different per row)."""
    rows = [[length - 1, 7, 0, 3], [length - 1, 2, length - 3, 10], [length - 1, 1, 5, 4]]
    return torch.tensor(rows[:batch])


def _probe_rows(model, inputs, queries: torch.Tensor,
                layers: tuple[int, ...] = LAYERS) -> dict[int, torch.Tensor]:
    probes = {j: TextAttentionProbe(model.model.language_model.layers[j].self_attn)
              for j in layers}
    handles = [probe.install() for probe in probes.values()]
    try:
        with torch.no_grad():
            model(**inputs)
        return {j: probe.rows(queries) for j, probe in probes.items()}
    finally:
        for handle in handles:
            handle.remove()


def _eager_rows(family: str, inputs, queries: torch.Tensor) -> dict[int, torch.Tensor]:
    model = cached_model(family, "eager", seed=1)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    layers = _layers(family)
    assert len(out.attentions) == 4 - len(get_adapter(model).recurrent_layers)
    batch = torch.arange(queries.shape[0])[:, None]
    # (B, H, L, L) -> (B, Q, H, L) -> (B, H, Q, L)
    return {j: out.attentions[attention_output_index(model, j)][batch, :, queries]
            .transpose(1, 2) for j in layers}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_probe_rows_equal_eager_attentions(family: str, batch: int) -> None:
    """Probe on an eager model: rows(queries) == out.attentions[j][:, :, queries] (1e-5)."""
    inputs = tiny_inputs(family, batch=batch)
    queries = _queries(inputs["input_ids"].shape[1], batch)
    got = _probe_rows(cached_model(family, "eager", seed=1), inputs, queries, _layers(family))
    want = _eager_rows(family, inputs, queries)
    for j in _layers(family):
        heads, length = 4, inputs["input_ids"].shape[1]
        assert got[j].shape == want[j].shape == (batch, heads, queries.shape[1], length)
        assert got[j].dtype == torch.float32
        torch.testing.assert_close(got[j], want[j], atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_probe_on_sdpa_model_equals_eager_attentions(family: str, batch: int) -> None:
    """Probe on an sdpa model (mask None or boolean) == eager weights of a same-seed twin."""
    inputs = tiny_inputs(family, batch=batch)
    queries = _queries(inputs["input_ids"].shape[1], batch)
    got = _probe_rows(cached_model(family, "sdpa", seed=1), inputs, queries, _layers(family))
    want = _eager_rows(family, inputs, queries)
    for j in _layers(family):
        torch.testing.assert_close(got[j], want[j], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_columns_get_no_attention(family: str) -> None:
    """Left-padded row: real queries give exactly 0 to padding keys; rows sum to 1."""
    inputs = tiny_inputs(family, batch=2)
    pad = inputs["attention_mask"] == 0
    assert bool(pad.any())
    length = inputs["input_ids"].shape[1]
    queries = torch.full((2, 1), length - 1)
    rows = _probe_rows(cached_model(family, "eager", seed=1), inputs, queries, (1,))[1]
    assert bool((rows[pad[:, None, None, :].expand_as(rows)] == 0).all())
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, 4, 1), atol=1e-5, rtol=0)


def test_probe_made_by_adapter_sits_on_that_layer() -> None:
    """``adapter.text_probe(j)`` probes decoder layer j's self-attention; unrun → RuntimeError."""
    model = cached_model("qwen2_vl", "eager", seed=1)
    probe = get_adapter(model).text_probe(2)
    assert probe.attention is model.model.language_model.layers[2].self_attn
    with pytest.raises(RuntimeError):
        probe.rows(torch.zeros(1, 1, dtype=torch.long))


def test_probe_on_a_linear_attention_layer_is_refused() -> None:
    """Qwen3.5's Gated DeltaNet layers compute no attention map: a probe there is refused,
    naming the full-attention layers; so is a decoder cut at or before the first
    full-attention layer (FastV with layer 1), at patch time, leaving no hook behind."""
    model = cached_model("qwen3_5", "sdpa", seed=1)
    with pytest.raises(ValueError, match=r"\[0\].*linear-attention.*\[1, 2\]"):
        get_adapter(model).text_probe(0)
    with pytest.raises(ValueError, match="after layer 1"):  # TransPrune cuts at 1 and 2
        vlprune.patch(model, "transprune", budget=4)
    with pytest.raises(ValueError, match=r"\[3\].*linear-attention"):  # attention at 3
        vlprune.patch(model, "transprune", budget=4, layers=(3,), ratios=(0.5,))
    for method, options in (("fastv", {}), ("fixed_layer", {"indices": [0]})):
        with pytest.raises(ValueError, match="after layer 1"):
            vlprune.patch(model, method, budget=4, layer=1, **options)
    assert vlprune_hook_count(model) == 0 and vlprune.get_handle(model) is None
