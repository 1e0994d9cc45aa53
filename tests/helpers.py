"""Helpers shared by the test suite: cached tiny models and inputs, forward / generate wrappers,
hook inventories, and the hand-built oracle (the unpatched language model fed only the kept rows
at their original positions).

Cached models are shared by every test that asks for the same (family, attention, seed): a
test must unpatch what it patches (context manager or ``finally``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import BatchFeature, DynamicCache, PreTrainedModel

from vlprune.compat import call_cache
from vlprune.registry import get_method, list_methods
from vlprune.testing import FAMILIES, tiny_inputs, tiny_model

ATTNS = ("sdpa", "eager")
MAX_NEW = 8
BIG = 10**6
"""A budget above every tiny image's token count: keeps everything."""


def method_families() -> list[tuple[str, str]]:
    """(method, family) for every registered method and every family it supports: new methods
    and families are covered automatically."""
    return [
        (method, family)
        for method in list_methods()
        for family in FAMILIES
        if get_method(method).families is None or family in get_method(method).families
    ]


PAIR_OPTIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("transprune", "qwen3_5"): {"layers": (2,), "ratios": (0.5,)},
}
"""Method options for (method, family) pairs whose defaults the model refuses at ``patch``.
TransPrune's default schedule needs full-attention layers for its whole accumulation window and
cuts after a hybrid decoder's first full-attention layer: Qwen3.5 refuses it with a
``ValueError`` (tested in ``test_text_signals`` / ``test_transprune``); one stage at layer 2 (a
full-attention layer after the first one, 1) is what it runs in the method × family tests."""


def pair_options(method: str, family: str) -> dict[str, Any]:
    """Options to patch ``family`` with ``method`` in the (method × family) tests."""
    return dict(PAIR_OPTIONS.get((method, family), {}))


def method_one_family() -> list[tuple[str, str]]:
    """(method, family) for every registered method, each with one family it supports (for
    tests too slow to run on every pair): the family tested least so far, ties broken by
    rotating through the families, so every family is covered once there are enough methods."""
    pairs = method_families()
    count = dict.fromkeys(FAMILIES, 0)
    out = []
    for i, method in enumerate(list_methods()):
        families = [f for m, f in pairs if m == method]
        family = min(families,
                     key=lambda f: (count[f], (FAMILIES.index(f) - i) % len(FAMILIES)))
        count[family] += 1
        out.append((method, family))
    return out


@functools.cache
def cached_model(family: str, attn: str = "sdpa", seed: int = 0) -> PreTrainedModel:
    """Shared tiny model (see the module docstring)."""
    return tiny_model(family, attn_implementation=attn, seed=seed)


@functools.cache
def cached_inputs(
    family: str, batch: int = 1, n_words: tuple[int, ...] | None = None, seed: int = 0
) -> BatchFeature:
    """Shared ``tiny_inputs`` (left-padded prompts, one image each); do not modify."""
    return tiny_inputs(family, batch=batch, n_words=list(n_words) if n_words else None, seed=seed)


def forward(model: PreTrainedModel, inputs: Any, **kwargs: Any) -> Any:
    """``model(**inputs, **kwargs)`` without gradients."""
    with torch.no_grad():
        return model(**inputs, **kwargs)


def generate(model: PreTrainedModel, inputs: Any, max_new_tokens: int = MAX_NEW,
             **kwargs: Any) -> torch.Tensor:
    """Greedy (unless ``kwargs`` say otherwise) new tokens only, (B', <= max_new_tokens)."""
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


def right_padded(inputs: Any) -> dict[str, Any]:
    """A copy of left-padded ``inputs`` with every row's padding moved to its right end."""
    out = dict(inputs)
    real = inputs["attention_mask"].sum(1).tolist()
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in inputs:
            out[key] = torch.stack([
                torch.roll(row, -(row.shape[0] - n)) for row, n in zip(inputs[key], real)
            ])
    return out


def trim(tokens: torch.Tensor, eos: int) -> list[int]:
    """A row of generated ids up to and including the first EOS (generate stops there)."""
    out = []
    for tok in tokens.tolist():
        out.append(tok)
        if tok == eos:
            break
    return out


def capture_lm_kwargs(model: PreTrainedModel, inputs: Any) -> dict[str, Any]:
    """The keyword inputs the language model receives in a plain forward of ``inputs``."""
    captured: dict[str, Any] = {}

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        captured.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward(model, inputs)
    finally:
        handle.remove()
    return captured


def _hook_owner(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(getattr(fn, "__func__", fn), "__module__", "") or ""


def all_hooks(model: torch.nn.Module) -> set[tuple[str, str, int]]:
    """Every forward (pre-)hook on every submodule, by (module name, kind, hook id)."""
    return {
        (name, kind, key)
        for name, module in model.named_modules()
        for kind, hooks in (("pre", module._forward_pre_hooks), ("post", module._forward_hooks))
        for key in hooks
    }


def vlprune_hook_count(model: torch.nn.Module) -> int:
    """Hooks installed by vlprune (transformers keeps its own output-capture hooks, installed
    lazily on the first forward, which are not ours to remove)."""
    return sum(
        _hook_owner(fn).startswith("vlprune")
        for module in model.modules()
        for hooks in (module._forward_pre_hooks, module._forward_hooks)
        for fn in hooks.values()
    )


# ---------------------------------------------------------------------------------- oracle


def keep_index(input_ids: torch.Tensor, image_token_id: int, local: list[int]) -> torch.Tensor:
    """(B, Lp) kept sequence positions: all text rows + image rows ``local`` (one image/row)."""
    rows = []
    for row in input_ids:
        is_image = row == image_token_id
        image_pos = is_image.nonzero().squeeze(1)
        keep = ~is_image
        keep[image_pos[local]] = True
        rows.append(keep.nonzero().squeeze(1))
    assert len({len(r) for r in rows}) == 1, "oracle needs equal kept counts per row"
    return torch.stack(rows)


def gather_positions(pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) or (R, B, L) gathered on the last dim with (B, Lp)."""
    if pos.dim() == 2:
        return pos.expand(index.shape[0], -1).gather(1, index)
    return torch.stack([p.expand(index.shape[0], -1).gather(1, index) for p in pos])


def kept_lm_extras(lm_kwargs: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """The language model's DeepStack inputs (Qwen3-VL ``visual_pos_masks`` and
    ``deepstack_visual_embeds``, as captured from an unpatched forward) for the kept sequence
    positions ``index`` (B, Lp); ``{}`` for models without them.

    Built independently of ``vlprune.hooks``: every feature tensor is scattered onto the full
    (B, L) sequence, then the kept positions are read back in order.
    """
    mask = lm_kwargs.get("visual_pos_masks")
    embeds = lm_kwargs.get("deepstack_visual_embeds")
    if mask is None or embeds is None:
        return {}
    rows = torch.arange(index.shape[0])[:, None]
    kept = mask[rows, index]
    out = []
    for feature in embeds:
        full = feature.new_zeros(*mask.shape, feature.shape[-1])
        full[mask] = feature
        out.append(full[rows, index][kept])
    return {"visual_pos_masks": kept, "deepstack_visual_embeds": out}


def attention_output_index(model: PreTrainedModel, layer: int) -> int:
    """Index of decoder layer ``layer`` in ``output.attentions`` (``output_attentions=True``):
    hybrid decoders (Qwen3.5) return the attentions of their full-attention layers only."""
    types = getattr(model.config.get_text_config(), "layer_types", None)
    if not types:
        return layer
    attention = [i for i, kind in enumerate(types) if kind != "linear_attention"]
    return attention.index(layer)


def oracle_inputs(
    model: PreTrainedModel, inputs: Any, local: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Kept embeddings, original positions, 2-D mask and extra inputs (DeepStack), gathered by
    hand from the unpatched model's language-model inputs (image rows ``local`` of each row's
    image kept)."""
    kw = capture_lm_kwargs(model, inputs)
    embeds = kw["inputs_embeds"]
    batch, length = embeds.shape[:2]
    pos = kw.get("position_ids")
    if pos is None:
        pos = torch.arange(length).expand(batch, length)
    mask = kw.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long)
    index = keep_index(inputs["input_ids"], model.config.image_token_id, local)
    rows = torch.arange(batch)[:, None]
    extras = kept_lm_extras(kw, index)
    return embeds[rows, index], gather_positions(pos, index), mask.gather(1, index), extras


def oracle_logits(model: PreTrainedModel, embeds: torch.Tensor, pos: torch.Tensor,
                  mask: torch.Tensor, extras: dict[str, Any] | None = None) -> torch.Tensor:
    """Logits of the unpatched language model (and head) on the given rows (``extras``: the
    kept rows' DeepStack inputs)."""
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=embeds, position_ids=pos, attention_mask=mask, **(extras or {})
        ).last_hidden_state
        return model.lm_head(hidden)


def oracle_generate(
    model: PreTrainedModel, embeds: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
    extras: dict[str, Any] | None = None, steps: int = MAX_NEW,
    follow_up: torch.Tensor | None = None, follow_steps: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy loop on the language model with a DynamicCache: prefill the kept rows at their
    original positions (with their DeepStack ``extras``); each new token sits at the next
    position after the last one fed (all M-RoPE rows), as ``generate`` advances positions.
    With ``follow_up`` (B, T) token ids (a second chat turn): after ``steps`` tokens, the last
    one and ``follow_up`` are fed, then ``follow_steps`` more tokens are generated. Returns
    (tokens, follow-up tokens or None)."""
    lm = model.model.language_model
    cache = DynamicCache(config=lm.config)
    embed = model.get_input_embeddings()
    state = {"last": pos[..., -1:], "mask": mask}

    def feed(new: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(1, new.shape[1] + 1)
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(new.shape)], 1)
        hidden = lm(inputs_embeds=embed(new), position_ids=state["last"] + offsets,
                    attention_mask=state["mask"], **call_cache(cache),
                    use_cache=True).last_hidden_state
        state["last"] = state["last"] + new.shape[1]
        return hidden

    def greedy(hidden: torch.Tensor, count: int, then: torch.Tensor | None) -> tuple:
        out = []
        for t in range(count):
            nxt = model.lm_head(hidden[:, -1]).argmax(-1)
            out.append(nxt)
            if t < count - 1:
                hidden = feed(nxt[:, None])
            elif then is not None:
                hidden = feed(torch.cat([nxt[:, None], then], 1))
        return torch.stack(out, 1), hidden

    with torch.no_grad():
        hidden = lm(inputs_embeds=embeds, position_ids=pos, attention_mask=mask,
                    **call_cache(cache), use_cache=True, **(extras or {})).last_hidden_state
        first, hidden = greedy(hidden, steps, follow_up)
        second = greedy(hidden, follow_steps, None)[0] if follow_up is not None else None
    return first, second
