"""Attention probes reuse the layer's own q / k / v: reading rows projects nothing again.

A probe keeps the outputs of the attention's projection modules from the layer's own call (the
first call after its pre-hook). Reading attention rows must then run no projection module, give
exactly what projecting the layer's input again gives, and ignore later calls of the projection
(another probe projecting other rows of that layer).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import cached_model, forward
from vlprune.adapters import get_adapter
from vlprune.hooks.signals import TextQKV, VisionQKV
from vlprune.testing import FAMILIES, tiny_inputs


def _projection_calls(modules: list[torch.nn.Module]) -> tuple[list[str], list]:
    """Record every call of ``modules`` (their class names) until the handles are removed."""
    calls: list[str] = []
    handles = [m.register_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__))
               for m in modules]
    return calls, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_text_probe_reads_the_layers_own_projections(family: str) -> None:
    """``TextQKV`` logits / values and probe rows run no projection module; they equal the
    projections of the layer's remembered input recomputed (bit for bit), which the probe falls
    back to where nothing was kept, without keeping what it projects itself."""
    model = cached_model(family)
    attention = get_adapter(model).decoder_layers[1].self_attn
    probe = TextQKV(get_adapter(model).text_probe(1))
    handle = probe.install()
    inputs = tiny_inputs(family, batch=2)
    queries = torch.tensor([[2, inputs["input_ids"].shape[1] - 1]] * 2)
    try:
        forward(model, inputs)
        calls, spies = _projection_calls([attention.q_proj, attention.k_proj, attention.v_proj])
        logits, values, rows = probe.logits(queries), probe.values(), probe.probe.rows(queries)
        for spy in spies:
            spy.remove()
        assert calls == []
        kept = dict(probe.probe.kept.outputs)
        probe.probe.kept.clear()  # nothing kept: the probe projects the remembered input
        assert torch.equal(probe.values(), values)
        assert torch.equal(probe.probe.rows(queries), rows)
        for name in ("q_proj", "k_proj", "v_proj"):
            hidden = probe.probe.inputs["hidden"]
            assert torch.equal(kept[name], getattr(attention, name)(hidden))
        assert torch.equal(probe.logits(queries), logits)
    finally:
        handle.remove()
        probe.clear()


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_probe_reads_the_layers_own_projections(family: str) -> None:
    """``VisionQKV.qkv`` runs no projection module and equals the projections of the
    remembered input recomputed; a later call of a projection does not replace the kept one."""
    model = cached_model(family)
    adapter = get_adapter(model)
    probe = VisionQKV(adapter.vision_probe(1))
    handle = probe.install()
    modules = [getattr(probe.probe.attention, name) for name in probe.probe.projections]
    try:
        forward(model, tiny_inputs(family, batch=2))
        calls, spies = _projection_calls(modules)
        got = probe.qkv()
        for spy in spies:
            spy.remove()
        assert calls == []
        hidden = probe.probe.inputs["hidden"]
        modules[0](hidden[..., :3, :])  # another caller projecting other rows
        after = probe.qkv()
        probe.probe.kept.clear()  # nothing kept: the probe projects the remembered input
        again = probe.qkv()
        assert len(got) == len(after) == len(again) > 0
        for seq_got, seq_after, seq_again in zip(got, after, again):
            for a, b, c in zip(seq_got, seq_after, seq_again):
                assert torch.equal(a, b) and torch.equal(a, c)
    finally:
        handle.remove()
        probe.clear()
