"""Served ranking: the popular-items list stays the exact popularity order as events arrive, and
threshold ranking over the two candidate lists equals a brute-force ranking by the formula."""

from __future__ import annotations

import numpy as np
import pytest

from felrec_stream.serving import ranking
from felrec_stream.serving.ranking import PopularItems, served_top_k
from felrec_stream.state.store import HistoryBuffer


def random_history(n_items: int, n_events: int, halflife: float, seed: int = 0,
                   batch: int = 16) -> tuple[HistoryBuffer, list[np.ndarray]]:
    """A buffer that counted Zipf-like item events in batches; also returns the batches."""
    rng = np.random.default_rng(seed)
    history = HistoryBuffer(4, capacity=n_items, halflife=halflife)
    history.ensure(n_items)
    weights = 1.0 / np.arange(1, n_items + 1)
    batches = [rng.choice(n_items, batch, p=weights / weights.sum()) for _ in range(n_events // batch)]
    return history, batches


def count(history: HistoryBuffer, slots: np.ndarray) -> None:
    history.apply(history.plan(slots, np.zeros(len(slots), dtype=np.int64)), slots=slots)


def brute_order(history: HistoryBuffer, n: int) -> np.ndarray:
    """Slots with popularity > 0 by (popularity desc, slot asc) at this moment."""
    slots = np.arange(n)
    pop = history.popularity(slots)
    order = np.lexsort((slots, -pop))
    return slots[order][pop[order] > 0]


@pytest.mark.parametrize("halflife", [0.0, 30.0])
@pytest.mark.parametrize("capacity", [8, 1000])
def test_popular_items_kept_incrementally_equal_the_popularity_order(halflife, capacity):
    n = 200
    history, batches = random_history(n, 960, halflife)
    popular = PopularItems(capacity)
    for step, slots in enumerate(batches):
        count(history, slots)
        if step % 3 == 0:  # refreshed after one batch or after several
            popular.refresh(history, n)
            expected = brute_order(history, n)
            got, complete = popular.top(history, n, capacity)
            np.testing.assert_allclose(history.popularity(got), history.popularity(expected[:capacity]), rtol=1e-9)
            assert complete == (len(expected) <= capacity)
            if complete:
                assert set(got) == set(expected)


def test_popular_items_grow_when_more_are_asked_for():
    n = 100
    history, batches = random_history(n, 640, 50.0)
    for slots in batches:
        count(history, slots)
    popular = PopularItems(4)
    popular.refresh(history, n)
    got, complete = popular.top(history, n, 40)
    expected = brute_order(history, n)
    assert len(got) == 40 and not complete
    np.testing.assert_allclose(history.popularity(got), history.popularity(expected[:40]), rtol=1e-9)


def brute_served(vectors: np.ndarray, history: HistoryBuffer, query: np.ndarray, weight: float, k: int,
                 exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(vectors, axis=1)
    scores = vectors @ (query / np.linalg.norm(query)) / np.where(norms > 0, norms, 1.0)
    scores = scores + weight * np.log1p(history.popularity(np.arange(len(vectors))))
    scores[exclude] = -np.inf
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return scores[order], order


def exact_cosine(vectors: np.ndarray, query: np.ndarray, exclude: np.ndarray):
    """The flat index's contract: (scores, slots) of the F best cosines, -1 padded."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos = unit @ (query / np.linalg.norm(query))
    cos[exclude] = -np.inf
    allowed = len(cos) - len(np.unique(exclude))

    def search(fetch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.lexsort((np.arange(len(cos)), -cos))[: min(fetch, allowed)]
        pad = fetch - len(order)
        return (np.concatenate([cos[order], np.full(pad, -np.inf)]),
                np.concatenate([order, np.full(pad, -1)]))
    return search


@pytest.mark.parametrize("weight, widens", [(0.05, True), (0.5, True), (3.0, False)])
def test_served_top_k_equals_brute_force_and_widens_when_the_bound_is_not_met(weight, widens, monkeypatch):
    """Exact for every weight; where cosine and prior both matter the first lists often cannot
    certify the top k and are doubled; a dominant prior is certified by the popular list alone."""
    monkeypatch.setattr(ranking, "MIN_CANDIDATES", 1)  # first lists of 2k: often too short to certify
    monkeypatch.setattr(ranking, "MIN_POPULAR", 1)
    n, dim = 600, 8
    history, batches = random_history(n, 4000, 200.0, seed=1)
    for slots in batches:
        count(history, slots)
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((n, dim))
    popular = PopularItems(capacity=16)  # small: large weights need the list to grow
    popular.refresh(history, n)
    searched: list[int] = []
    for trial in range(20):
        query = rng.standard_normal(dim)
        exclude = rng.choice(n, 5, replace=False)
        cosine = exact_cosine(vectors, query, exclude)

        def search(fetch: int, cosine=cosine) -> tuple[np.ndarray, np.ndarray]:
            searched.append(fetch)
            return cosine(fetch)

        k = 5 if trial % 2 else 40
        scores, slots = served_top_k(query, k, weight, exclude=exclude, cosine_search=search,
                                     raw_vectors=lambda s: vectors[s], history=history, n_items=n, popular=popular)
        want_scores, want_slots = brute_served(vectors, history, query, weight, k, exclude)
        np.testing.assert_array_equal(slots, want_slots)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-9)
    assert (len(searched) > 20) == widens  # 20 queries: more searches = some were widened
