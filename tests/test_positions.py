"""``positions="renumber"``: the kept rows renumbered contiguously after every cut.

Oracle (built by hand, eager and sdpa attention): the unpatched language model's layers, run one
by one on the rows the language model receives (the vision-side cut's kept rows, numbered
``p0, p0 + 1, …``); at each decoder cut the method's own ``choose`` scores the hand-run tensors
(its probes sit on the hand-run layers, so they see the renumbered positions), the kept rows are
gathered and renumbered again. Decoding continues each layer's segment right after its
renumbered prompt, as the official TransPrune and FlowCut code shift decode positions at every
pruning layer: a token t steps after a prompt whose rows entering layer l number n_l sits at
``p0 + n_l + t`` there, and each layer's KV cache holds its own segment's rows.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

import vlprune
from tests.helpers import ATTNS, BIG, MAX_NEW, cached_inputs, cached_model, forward, generate
from vlprune.adapters import get_adapter
from vlprune.budget import Budget
from vlprune.compat import call_cache, output_cache
from vlprune.hooks.positions import renumber
from vlprune.methods.base import DecoderBatch
from vlprune.registry import build_method

ATOL = 1e-5
def test_renumber_by_hand() -> None:
    """Real rows are numbered on from the first real row's own position (padding rows and slots
    take their predecessor's number); the shift is how far the last real row moved down."""
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 3, 7, 8, 9, 12]])
    real = torch.tensor([[False, True, True, False, True, True], [True] * 5 + [False]])
    new, shift = renumber(positions, real)
    assert new.tolist() == [[1, 1, 2, 2, 3, 4], [0, 1, 2, 3, 4, 4]]
    assert shift.tolist() == [[1], [5]]


# (method, family, prompt seed, patch keyword arguments, renumbering changes the kept tokens):
# decoder cuts (three, one), a vision-side cut before a decoder cut (FlowCut's LLaVA-NeXT path),
# vision-side cuts alone; LLaVA-OneVision (Qwen2 language model, 1-D RoPE) with both. Where the
# kept tokens change, a later cut scored on original positions would keep the original-position
# run's tokens, not the oracle's.
CASES = [
    ("transprune", "llava", 1, {"budget": 11, "layers": (1, 2, 3)}, True),
    ("fastv", "llava", 0, {"budget": 4}, False),
    ("flowcut", "llava_next", 0, {"budget": 12}, True),
    ("hiprune", "llava", 0, {"budget": 7}, False),
    ("flowcut", "llava", 0, {"budget": 6}, False),
    ("flowcut", "llava_onevision", 0, {"budget": 12}, True),  # Qwen2 LM, SigLIP encoder cut
    ("fastv", "llava_onevision", 1, {"budget": 5}, False),
]


def _lm_inputs(model, inputs: Any, **patch: Any) -> tuple[dict, Any]:
    """The language model's keyword inputs in a patched prefill (after the vision-side cut),
    and the patch's stats."""
    seen: dict[str, Any] = {}

    def remember(module: Any, args: tuple, kwargs: dict) -> None:
        seen.update(kwargs)

    with vlprune.patch(model, **patch) as handle:
        hook = model.model.language_model.register_forward_pre_hook(remember, with_kwargs=True)
        try:
            forward(model, inputs)
        finally:
            hook.remove()
        return seen, handle.stats


def _layer(lm, layer, hidden, positions, cache, causal: bool) -> torch.Tensor:
    mask = None
    if causal:
        ones = torch.ones(hidden.shape[:2], dtype=torch.long)
        mask = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=ones,
                                  **call_cache(None), position_ids=positions)
    return layer(hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, positions),
                 position_ids=positions, **call_cache(cache), use_cache=True)


def hand_run(model, inputs: Any, method: str, budget: int, steps: int = MAX_NEW,
             **options: Any) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The oracle of the module docstring for one prompt (batch 1, one image). Returns the
    logits of the last prompt row and of every decode step (1, steps, V), the greedy tokens
    (1, steps), and the rows entering each layer."""
    lm, adapter = model.model.language_model, get_adapter(model)
    lm_kwargs, _ = _lm_inputs(model, inputs, method=method, budget=budget, positions="renumber",
                              **options)
    embeds = lm_kwargs["inputs_embeds"]
    n_rows = embeds.shape[1]
    given = lm_kwargs.get("position_ids")  # None: the language model numbers 0, 1, …
    start = 0 if given is None else int(given[0, 0])
    if given is not None:
        torch.testing.assert_close(given[0], start + torch.arange(n_rows))
    prompt = inputs["input_ids"][0] == model.config.image_token_id
    first = int(prompt.nonzero()[0, 0])
    kept_visual = n_rows - (prompt.numel() - int(prompt.sum()))
    is_image = torch.zeros(1, n_rows, dtype=torch.bool)
    is_image[0, first:first + kept_visual] = True

    method_ = build_method(method, options)
    method_.check_model(adapter)
    cuts = method_.cut_layers(len(lm.layers))
    probes = method_.probes(adapter)
    hooks = [probe.install() for probe in probes.values()]
    index, layer_index, rows = torch.arange(n_rows)[None], {}, []
    cache = DynamicCache(config=lm.config)
    valid = torch.ones(1, n_rows, dtype=torch.bool)
    try:
        with torch.no_grad():
            hidden = embeds
            for i, layer in enumerate(lm.layers):
                if i in cuts:
                    ctx = DecoderBatch(
                        layer=i, hidden=hidden, is_image=is_image.gather(1, index),
                        probes=probes, index=index, layer_index=dict(layer_index),
                        valid=torch.ones_like(index, dtype=torch.bool),
                        input_visual=is_image.sum(1), image_tokens=[[int(prompt.sum())]],
                        layer_valid={k: torch.ones_like(v, dtype=torch.bool)
                                     for k, v in layer_index.items()},
                        input_valid=valid,
                    )
                    chosen = method_.choose(ctx, Budget(tokens=budget))
                    if chosen is not None:
                        hidden, index = hidden[:, chosen[0]], index[:, chosen[0]]
                if cuts and i >= cuts[0]:
                    layer_index[i] = index
                rows.append(index.shape[1])
                positions = start + torch.arange(index.shape[1])[None]
                hidden = _layer(lm, layer, hidden, positions, cache, causal=True)
            logits = [model.lm_head(lm.norm(hidden[:, -1]))]
            tokens = []
            for t in range(steps):
                tokens.append(logits[-1].argmax(-1))
                if t == steps - 1:
                    break
                hidden = model.get_input_embeddings()(tokens[-1][:, None])
                for i, layer in enumerate(lm.layers):
                    positions = torch.tensor([[start + rows[i] + t]])
                    hidden = _layer(lm, layer, hidden, positions, cache, causal=False)
                logits.append(model.lm_head(lm.norm(hidden[:, -1])))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(logits, 1), torch.stack(tokens, 1), rows


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize(("method", "family", "seed", "patch", "moves"), CASES)
def test_renumbered_run_equals_hand_run(method: str, family: str, seed: int, patch: dict,
                                        moves: bool, attn: str) -> None:
    """Prefill logits, every decode step's logits, the greedy tokens and the rows entering each
    layer equal the oracle's; original positions give other logits (the check has teeth), and
    on the marked prompts other kept tokens."""
    model, inputs = cached_model(family, attn), cached_inputs(family, 1, None, seed)
    options = {k: v for k, v in patch.items() if k != "budget"}
    ref_logits, ref_tokens, rows = hand_run(model, inputs, method, patch["budget"], **options)
    with vlprune.patch(model, method, positions="renumber", **patch) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        stats = handle.stats
        kept = handle.kept_images()[0].kept
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    steps = tokens.shape[1]  # generate stops early at EOS
    assert stats.layer_tokens == [rows]
    assert stats.settings["positions"] == "renumber"
    torch.testing.assert_close(torch.stack(out.logits, 1), ref_logits[:, :steps], atol=ATOL,
                               rtol=0)
    assert torch.equal(tokens, ref_tokens[:, :steps])
    with vlprune.patch(model, method, **patch) as handle, torch.no_grad():
        original = model(**inputs).logits[:, -1]
        assert torch.equal(handle.kept_images()[0].kept, kept) != moves
    assert (original - ref_logits[:, 0]).abs().max() > 1e-3


# ------------------------------------------------------------------- batches, decode paths

N_WORDS = (5, 9)  # ``cached_inputs(family, batch=2)`` rows; row i alone: n_words[i], seed i
BATCHED = [
    ("transprune", "llava", {"ratio": 0.25, "layers": (1, 2, 3)}),
    ("fastv", "llava", {"budget": 4}),
    ("flowcut", "llava_next", {"budget": 12}),
    ("hiprune", "llava", {"budget": 7}),
]


def _alone(family: str, row: int) -> Any:
    return cached_inputs(family, 1, (N_WORDS[row],), row)


@pytest.mark.parametrize(("method", "family", "patch"), BATCHED)
def test_padded_batch_equals_each_prompt_alone(method: str, family: str, patch: dict) -> None:
    """Left-padded rows of different lengths (different visual counts kept per layer, padding
    slots) renumber from their own first token: the batch generates what each prompt does
    alone; ``use_cache=False`` (each step re-runs the renumbered sequence) equals the cached
    run."""
    model, inputs = cached_model(family), cached_inputs(family, batch=2)
    with vlprune.patch(model, method, positions="renumber", **patch):
        tokens = generate(model, inputs)
        for row in range(2):
            alone = generate(model, _alone(family, row))
            assert torch.equal(tokens[row, :alone.shape[1]], alone[0])
        assert torch.equal(generate(model, inputs, use_cache=False), tokens)


@pytest.mark.parametrize(("method", "family", "patch"), [BATCHED[0], *BATCHED[2:]])
def test_manual_decode_and_follow_up(method: str, family: str, patch: dict) -> None:
    """A hand-rolled cached decode without ``position_ids`` (the language model numbers new
    tokens from the cache's logical length) gives ``generate``'s logits; then three tokens fed
    at once (a follow-up turn) give the same last logits as feeding them one by one."""
    model, inputs = cached_model(family), cached_inputs(family, batch=1)
    follow = torch.tensor([[5, 6, 7]])
    with vlprune.patch(model, method, positions="renumber", **patch), torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        tokens = gen.sequences[:, inputs["input_ids"].shape[1]:]
        out = model(**inputs, use_cache=True)
        logits, mask, cache = [out.logits[:, -1]], inputs["attention_mask"], output_cache(out)
        for t in range(tokens.shape[1] - 1):
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            out = model(input_ids=tokens[:, t:t + 1], attention_mask=mask, **call_cache(cache))
            logits.append(out.logits[:, -1])
        torch.testing.assert_close(torch.stack(logits, 1), torch.stack(gen.logits, 1),
                                   atol=ATOL, rtol=0)
        copy_cache = output_cache(out)
        results = []
        for feed in ([follow], [follow[:, :1], follow[:, 1:2], follow[:, 2:]]):
            cache = copy.deepcopy(copy_cache)
            step_mask = mask
            for ids in feed:
                step_mask = torch.cat([step_mask, step_mask.new_ones(1, ids.shape[1])], 1)
                chunk = model(input_ids=ids, attention_mask=step_mask, **call_cache(cache))
            results.append(chunk.logits[:, -1])
    torch.testing.assert_close(results[0], results[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("method", "family"), [("fastv", "llava"), ("transprune", "llava"),
                                                ("hiprune", "llava"), ("flowcut", "llava_next")])
def test_keep_all_equals_unpatched(method: str, family: str) -> None:
    """Keeping every token renumbers nothing: logits and greedy tokens equal the unpatched
    model's."""
    model, inputs = cached_model(family), cached_inputs(family, batch=2)
    ref_logits, ref_tokens = forward(model, inputs).logits, generate(model, inputs)
    with vlprune.patch(model, method, budget=BIG, positions="renumber"):
        torch.testing.assert_close(forward(model, inputs).logits, ref_logits, atol=ATOL, rtol=0)
        assert torch.equal(generate(model, inputs), ref_tokens)


def test_unknown_positions_raise_before_any_hook() -> None:
    """An unknown value raises ``ValueError`` naming ``positions``; nothing is installed."""
    model = cached_model("llava")
    with pytest.raises(ValueError, match="positions"):
        vlprune.patch(model, "fastv", budget=4, positions="contiguous")
    assert vlprune.get_handle(model) is None


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe",
                                    "qwen3_5"])
def test_renumber_refuses_mrope_before_any_hook(family: str) -> None:
    """Renumbering a model with M-RoPE positions (Qwen-VL, Qwen3.5) raises ``ValueError``
    naming ``positions``; nothing is installed."""
    qwen = cached_model(family)
    assert get_adapter(qwen).rope == "mrope"
    with pytest.raises(ValueError, match=r"positions='renumber'.*M-RoPE"):
        vlprune.patch(qwen, "fastv", budget=4, positions="renumber")
    assert vlprune.get_handle(qwen) is None
