"""The served score and how the query API ranks every item by it without scanning them all.

score(u, x) = cos(u, x) + w * log(1 + popularity(x))  (`felrec_stream.scoring.served_score`,
`config.ScoringConfig`; popularity = the store's decayed interaction counts,
`HistoryBuffer.popularity`), exactly what the evaluator scores with (training/felrec_online.py):
what is served is what was measured.

Why not fold the prior into the index (item vector [x/|x|, log(1 + pop)], query [u/|u|, w]): with
a half-life every item's popularity decays at every event, and log(1 + pop) does not factor into a
per-item part and a shared one, so every indexed vector would go stale between the events that
touch its item (rewriting 1M ANN entries per batch is not an option). Changing the prior to
log(pop) would make the drift a shared constant, but it changes what the evaluator measured.

Instead, threshold ranking over two candidate lists, each cheap to keep current:

1. the index's cosine top-F for the query (exact with a flat index, approximate with hnsw/ivf);
2. the P most popular items right now (`PopularItems`: the order of popularities never changes
   between the events that touch an item, so the list is maintained from the touched items only);
   P starts larger than F (MIN_POPULAR): taking them needs no search, and a longer list lowers
   the bound below at once when the prior matters.

Every candidate is scored exactly. An item in neither list scores at most cos_F + w * log(1 + pop_P)
(the F-th cosine, the P-th popularity): once the k-th best candidate scores above that bound, the
top k is the exact top k of the formula (given the index's cosine list); otherwise F and P double.
With a flat index the result is the brute-force ranking; with an ANN index only the cosine list is
approximate (bench_query.py reports recall@10 against the exact served ranking).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from felrec_stream.scoring import log_popularity, served_score
from felrec_stream.state.store import HistoryBuffer

MIN_CANDIDATES = 64  # cosine candidates at the first try (an ANN search: the costly list)
MIN_POPULAR = 256  # popular candidates at the first try: a slice of a kept list, cheap to score, and
                    # long enough that its bound certifies the top k at once unless cosine dominates
POPULAR_CAPACITY = 4096  # popular items kept; grows (one O(N) rebuild) when a query needs more
BOUND_MARGIN = 1e-6  # float noise between the index's and the recomputed cosines: widen on near-ties


class PopularItems:
    """Item slots in decreasing order of current popularity (the top `capacity`), kept incrementally.

    With half-life h, popularity(s) at event t = pop[s] * 2 ** (-(t - pop_at[s]) / h), so
    log2(popularity) = key(s) - t / h with key(s) = log2(pop[s]) + pop_at[s] / h: the order by
    `key` is the order by popularity at *every* t, and a key only changes (grows) when an event
    touches s. The top-`capacity` by key is therefore the old top-`capacity` merged with the items
    touched since (pop_at >= the event count at the last refresh). h = 0: key = the plain count.
    Callers hold the store's lock (refresh reads arrays the writer changes).
    """

    def __init__(self, capacity: int = POPULAR_CAPACITY) -> None:
        self.capacity = capacity
        self.slots = np.zeros(0, dtype=np.int64)  # sorted by (key desc, slot asc)
        self.complete = True  # the list holds every item with popularity > 0
        self._events: int | None = None
        self._history: HistoryBuffer | None = None

    def refresh(self, history: HistoryBuffer, n: int) -> None:
        """Bring the list up to date with `history` (its first `n` slots)."""
        if history is not self._history or self._events is None or history.events < self._events:
            self._rebuild(history, n)
        elif history.events > self._events:
            touched = np.flatnonzero(history.pop_at[:n] >= self._events)
            self._keep_top(history, np.union1d(self.slots, touched), complete=self.complete)
        self._events, self._history = history.events, history

    def top(self, history: HistoryBuffer, n: int, m: int) -> tuple[np.ndarray, bool]:
        """(the `m` most popular slots, whether they are every item with popularity > 0)."""
        if m > len(self.slots) and not self.complete:
            self.capacity = max(2 * self.capacity, m)
            self._rebuild(history, n)
        return self.slots[:m], self.complete and m >= len(self.slots)

    def _rebuild(self, history: HistoryBuffer, n: int) -> None:
        self._keep_top(history, np.arange(n, dtype=np.int64), complete=True)
        self._events, self._history = history.events, history

    def _keep_top(self, history: HistoryBuffer, slots: np.ndarray, complete: bool) -> None:
        keys = _order_keys(history, slots)
        live = keys > -np.inf
        slots, keys = slots[live], keys[live]
        if len(slots) > self.capacity:
            part = np.argpartition(-keys, self.capacity - 1)[: self.capacity]
            cut = keys[part].min()
            part = np.flatnonzero(keys >= cut)  # keep boundary ties: ordered by slot below
            slots, keys, complete = slots[part], keys[part], False
        order = np.lexsort((slots, -keys))[: self.capacity]
        self.slots, self.complete = slots[order], complete and len(order) == len(slots)


def _order_keys(history: HistoryBuffer, slots: np.ndarray) -> np.ndarray:
    """Time-invariant order key of each slot's popularity (-inf for none; see PopularItems)."""
    pop = history.pop[slots]
    with np.errstate(divide="ignore"):
        if not history.halflife:
            return np.where(pop > 0, pop, -np.inf)
        return np.where(pop > 0, np.log2(pop) + history.pop_at[slots] / history.halflife, -np.inf)


def served_top_k(query: np.ndarray, k: int, weight: float, *, exclude: np.ndarray,
                 cosine_search: Callable[[int], tuple[np.ndarray, np.ndarray]],
                 raw_vectors: Callable[[np.ndarray], np.ndarray], history: HistoryBuffer, n_items: int,
                 popular: PopularItems) -> tuple[np.ndarray, np.ndarray]:
    """(scores, slots) of the k best items by cos + weight * log(1 + popularity), (score desc, slot asc).

    `cosine_search(F)` returns the index's (scores, slots) for the F best cosines, `exclude` left
    out, -1 padded; `raw_vectors(slots)` the stored vectors. See the module docstring.
    """
    q = np.asarray(query, dtype=np.float64)
    q = q / np.linalg.norm(q) if np.linalg.norm(q) > 0 else q
    fetch = max(2 * k, MIN_CANDIDATES)
    pop_fetch = max(fetch, MIN_POPULAR)
    while True:
        cos_scores, cos_slots = cosine_search(fetch)
        found = cos_slots >= 0
        cos_complete = int(found.sum()) < fetch  # the index has nothing more to give
        popular_slots, pop_complete = popular.top(history, n_items, pop_fetch)
        candidates = np.union1d(cos_slots[found], popular_slots[~np.isin(popular_slots, exclude)])
        scores = _scores(q, candidates, weight, raw_vectors, history)
        best = np.lexsort((candidates, -scores))[:k]
        if cos_complete or fetch >= n_items:
            return scores[best], candidates[best]
        prior_bound = 0.0 if pop_complete or not len(popular_slots) else \
            float(log_popularity(history.popularity(popular_slots[-1:]))[0])
        bound = float(cos_scores[fetch - 1]) + weight * prior_bound
        if len(best) == k and scores[best[-1]] > bound + BOUND_MARGIN:
            return scores[best], candidates[best]
        fetch, pop_fetch = 2 * fetch, 2 * pop_fetch


def _scores(q: np.ndarray, slots: np.ndarray, weight: float, raw_vectors: Callable[[np.ndarray], np.ndarray],
            history: HistoryBuffer) -> np.ndarray:
    """Exact served scores (float64) of `slots`; zero vectors have cosine 0."""
    x = np.asarray(raw_vectors(slots), dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    cosine = (x @ q) / np.where(norms > 0, norms, 1.0)
    return served_score(cosine, history.popularity(slots), weight)
