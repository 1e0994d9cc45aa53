"""Vision-side baselines ``random``, ``uniform`` and ``fixed``: exact kept counts, sorted and
unique indices, ``uniform``'s spacing, ``random``'s reproducibility (calls, batch composition,
seeds), on hand-made batches and through ``vlprune.patch`` on every family."""

from __future__ import annotations

import pytest
import torch

import vlprune
from tests.helpers import cached_model
from vlprune.adapters.base import ImageLayout
from vlprune.budget import Budget, kept_count
from vlprune.methods.base import VisionBatch
from vlprune.methods.fixed import FixedPrune
from vlprune.methods.random import RandomPrune
from vlprune.methods.uniform import UniformPrune, evenly_spaced
from vlprune.testing import FAMILIES, tiny_inputs


def _layout(n: int) -> ImageLayout:
    side = int(n**0.5)
    return ImageLayout(num_tokens=n, grid=(side, n // side) if side * (n // side) == n else (1, n))


def _select(method, sizes: list[int], budget: Budget) -> list[torch.Tensor]:
    """Run ``method`` on a hand-made VisionBatch of images with ``sizes`` tokens."""
    layouts = [_layout(n) for n in sizes]
    keep = method.budgets(layouts, budget)
    batch = VisionBatch(
        layouts=layouts,
        keep=keep,
        features=[torch.zeros(n, 4) for n in sizes],
        sample=list(range(len(sizes))),
        input_ids=torch.zeros(len(sizes), 1, dtype=torch.long),
        text_embeds=torch.zeros(len(sizes), 1, 4),
        probes={},
    )
    return method.select(batch)


def _assert_valid(kept: list[torch.Tensor], sizes: list[int], counts: list[int]) -> None:
    assert len(kept) == len(sizes)
    for idx, n, k in zip(kept, sizes, counts):
        assert idx.dtype == torch.long and idx.dim() == 1
        assert idx.numel() == k
        assert bool((idx.diff() > 0).all()), "not sorted / not unique"
        assert int(idx.min()) >= 0 and int(idx.max()) < n


# ------------------------------------------------------------------------------ uniform


@pytest.mark.parametrize(("n", "k"), [
    (36, 1), (36, 5), (36, 9), (36, 35), (36, 36), (140, 7), (24, 24), (576, 64), (7, 3),
    (1000, 999), (2, 1),
])
def test_evenly_spaced_is_sorted_unique_and_spans(n: int, k: int) -> None:
    """evenly_spaced(n, k): k sorted unique indices in [0, n), first < n/k, last ≥ n - n/k."""
    idx = evenly_spaced(n, k)
    assert idx.dtype == torch.long and idx.shape == (k,)
    assert bool((idx.diff() > 0).all())
    assert 0 <= int(idx[0]) < n / k
    assert n - n / k <= int(idx[-1]) < n


def test_evenly_spaced_gaps_are_even() -> None:
    """Consecutive gaps differ by at most one (equal slices of the token range)."""
    for n, k in ((36, 5), (140, 9), (576, 64), (100, 7)):
        gaps = evenly_spaced(n, k).diff()
        assert int(gaps.max() - gaps.min()) <= 1
    assert evenly_spaced(36, 36).tolist() == list(range(36))
    assert evenly_spaced(16, 4).tolist() == [2, 6, 10, 14]


def test_uniform_select_matches_evenly_spaced() -> None:
    """uniform keeps evenly_spaced(N_i, keep_i) of every image."""
    sizes = [36, 140, 24]
    kept = _select(UniformPrune(), sizes, Budget(tokens=7))
    _assert_valid(kept, sizes, [7, 7, 7])
    for idx, n in zip(kept, sizes):
        assert torch.equal(idx, evenly_spaced(n, 7))


# ------------------------------------------------------------------------------- random


def test_random_is_reproducible_across_calls() -> None:
    """Same seed, same image size → same kept tokens on every call."""
    method = RandomPrune(seed=3)
    first = _select(method, [36], Budget(tokens=5))[0]
    for _ in range(3):
        assert torch.equal(_select(method, [36], Budget(tokens=5))[0], first)
    assert torch.equal(_select(RandomPrune(seed=3), [36], Budget(tokens=5))[0], first)


def test_random_is_independent_of_batch_composition() -> None:
    """An image keeps the same tokens alone or among other images (any order, any sizes)."""
    method = RandomPrune(seed=0)
    alone = {n: _select(method, [n], Budget(tokens=6))[0] for n in (36, 140, 24)}
    for sizes in ([36, 140, 24], [24, 24, 36], [140, 36]):
        for idx, n in zip(_select(method, sizes, Budget(tokens=6)), sizes):
            assert torch.equal(idx, alone[n])


def test_random_differs_across_seeds() -> None:
    """Different seeds keep different subsets (5 of 36: collisions are vanishingly rare)."""
    picks = {tuple(_select(RandomPrune(seed=s), [36], Budget(tokens=5))[0].tolist())
             for s in range(6)}
    assert len(picks) == 6


def test_random_does_not_touch_the_global_rng() -> None:
    """Selection uses its own generator: the global torch RNG stream is unchanged."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _select(RandomPrune(seed=1), [36, 24], Budget(tokens=4))
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------- every baseline


def _methods():
    return [RandomPrune(seed=0), UniformPrune(), FixedPrune(indices=list(range(0, 24, 2)))]


@pytest.mark.parametrize("budget", [
    Budget(tokens=1), Budget(tokens=5), Budget(tokens=12), Budget(tokens=24), Budget(tokens=500),
    Budget(ratio=0.1), Budget(ratio=0.5), Budget(ratio=1.0),
])
def test_every_baseline_keeps_kept_count(budget: Budget) -> None:
    """random / uniform keep kept_count(N_i) per image; fixed keeps min(that, len(indices))."""
    sizes = [24, 36, 140]
    for method in _methods():
        kept = _select(method, sizes, budget)
        counts = [kept_count(n, budget=budget.tokens, ratio=budget.ratio) for n in sizes]
        if isinstance(method, FixedPrune):
            counts = [min(c, 12) for c in counts]
        _assert_valid(kept, sizes, counts)


def test_fixed_keeps_the_first_indices_in_sorted_order() -> None:
    """fixed sorts and de-duplicates its indices; a budget cap keeps the first ones."""
    method = FixedPrune(indices=[9, 2, 2, 30, 5])
    assert _select(method, [36], Budget(tokens=100))[0].tolist() == [2, 5, 9, 30]
    assert _select(method, [36], Budget(tokens=2))[0].tolist() == [2, 5]
    with pytest.raises(ValueError, match="30"):
        _select(method, [24], Budget(tokens=100))
    per_image = FixedPrune(indices=[[0, 1], [3, 4]])
    assert [t.tolist() for t in _select(per_image, [24, 24], Budget(tokens=9))] == [[0, 1], [3, 4]]


# ------------------------------------------------------------------- through the API


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("method", "options"), [
    ("random", {"budget": 5}),
    ("random", {"ratio": 0.3, "seed": 7}),
    ("uniform", {"budget": 5}),
    ("uniform", {"ratio": 0.3}),
    ("fixed", {"budget": 4, "indices": [1, 2, 8, 13, 21]}),
])
def test_stats_report_kept_count_per_image(family: str, method: str, options: dict) -> None:
    """Through patch(): each image keeps exactly the count the budget implies (stats)."""
    model = cached_model(family, seed=4)
    inputs = tiny_inputs(family, batch=2)
    n = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    if method == "fixed":
        k = 4
    else:
        k = kept_count(n, budget=options.get("budget"), ratio=options.get("ratio"))
    with vlprune.patch(model, method, **options) as handle, torch.no_grad():
        logits = model(**inputs).logits
        stats = handle.stats
    assert stats.visual_tokens == [n, n]
    assert stats.kept_per_image == [k, k]
    assert stats.kept_tokens == [k, k]
    assert logits.shape[1] == stats.kept_seq_len == stats.seq_len - n + k
