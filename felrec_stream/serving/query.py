"""The query engine: top-k recommendations, similar items/users and raw vectors over one store.

`QueryEngine` answers from one `RepresentationStore`. Every read holds the *same* lock the
streaming worker holds while it applies a micro-batch, so a query never sees half a batch (a
user's vector from after the batch with item vectors from before it). Recommendations rank by the
served score over ANN + popular candidates (`serving.ranking`), without the user's recent items
(`scoring.exclude_recent`). Searches go through the backend's `VectorBackend.search` (FAISS: exact
or ANN, as configured; others: an exact cosine scan with the same ordering, score desc, slot asc),
so results never depend on the backend. With a capped store
(cache.max_entities) searches rank the entities held in memory only (plus, with a popularity
prior, the most popular items, read from their files when spilled), while point reads (the query
entity's vector and history, `vectors`) come from `EntityTable.read`, which serves spilled
entities from their Parquet files without bringing them back into memory.

Errors are `ServiceError`s the HTTP layer (`serving.app`) maps to status codes; messages quote at
most `MAX_ECHO_CHARS` characters of any id (untrusted clients).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from felrec_stream.config import CacheConfig, ScoringConfig
from felrec_stream.errors import ServiceError
from felrec_stream.serving.ranking import PopularItems, served_top_k
from felrec_stream.serving.schema import CatalogInfo, Recommendations, Scored
from felrec_stream.state.engine import cold_vectors
from felrec_stream.state.store import Kind, RepresentationStore
from felrec_stream.stream.messages import id_problem

MAX_K = 1000  # larger k is a bulk export, not a query: use `felrec-stream export`
MAX_IDS = 1000  # ids per vectors request
MAX_ECHO_CHARS = 64  # of an id quoted in an error message
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class NotFound(ServiceError):
    """An id the store has never seen (HTTP 404)."""


class InvalidRequest(ServiceError):
    """A query outside the service's limits (HTTP 422)."""


class TooLarge(ServiceError):
    """A request above the service's size limits (HTTP 413)."""


# ---- freshness -----------------------------------------------------------------------------------

class FreshnessTracker:
    """Seconds from an event's arrival to it being queryable, as a histogram + last-batch figures.

    Thread-safe: the worker records, the /metrics scrape reads.
    """

    def __init__(self, buckets: Sequence[float] = FRESHNESS_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._counts = np.zeros(len(self.buckets) + 1, dtype=np.int64)  # last one = +Inf
        self._sum, self._n = 0.0, 0
        self.last_max: float | None = None
        self.last_median: float | None = None

    def record(self, arrival_times: Iterable[float], now: float | None = None) -> np.ndarray:
        """Record events that became queryable at `now` (time.time()); returns their freshness."""
        arrivals = np.fromiter((float(t) for t in arrival_times), dtype=np.float64)
        lag = np.maximum((time.time() if now is None else now) - arrivals, 0.0)
        if not len(lag):
            return lag
        bins = np.searchsorted(np.asarray(self.buckets), lag, side="left")
        with self._lock:
            self._counts += np.bincount(bins, minlength=len(self._counts))
            self._sum += float(lag.sum())
            self._n += len(lag)
            self.last_max, self.last_median = float(lag.max()), float(np.median(lag))
        return lag

    def histogram(self) -> tuple[list[tuple[str, int]], float, int]:
        """(cumulative buckets [(le, count)], sum, count) in Prometheus' format."""
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total, n = self._sum, self._n
        bounds = [repr(float(b)) for b in self.buckets] + ["+Inf"]
        return list(zip(bounds, cumulative)), total, n


# ---- engine --------------------------------------------------------------------------------------

class QueryEngine:
    """Consistent top-k / similarity / vector reads over one RepresentationStore.

    `lock` must be the lock the writer holds while it changes the store (the worker passes its
    own); a standalone engine over a frozen snapshot store gets a private one. A writer that
    registers a batch's new ids before it encodes them (the worker: `pipelines/worker.py` apply)
    passes `committed_sizes`, the number of users/items whose vectors it has written, read under
    the lock: slots beyond them are not served yet (unknown ids, never in results).

    Recommendations rank by the served score (`serving.ranking`, `scoring`); similar items/users
    by cosine. `cold_start` (in-process model only) encodes an unknown user's empty history.
    """

    def __init__(self, store: RepresentationStore, lock: threading.RLock | None = None, *,
                 scoring: ScoringConfig | None = None, cold_start: Callable[[str], np.ndarray] | None = None,
                 committed_sizes: Callable[[], Mapping[Kind, int]] | None = None,
                 snapshot_seq: int | None = None, snapshot_created_at: str | None = None,
                 freshness: FreshnessTracker | None = None, max_k: int = MAX_K) -> None:
        self.store = store
        self.lock = lock if lock is not None else threading.RLock()
        self.scoring = scoring or ScoringConfig()
        self.cold_start = cold_start
        self.committed_sizes = committed_sizes
        self.snapshot_seq, self.snapshot_created_at = snapshot_seq, snapshot_created_at
        self.freshness = freshness or FreshnessTracker()
        self.max_k = max_k
        self.popular = PopularItems()

    # -- queries --

    def recommend(self, user_id: str, k: int = 10, exclude_recent: bool | None = None) -> Recommendations:
        """Items by the served score for the user's vector, without the items in its last-L history
        when `exclude_recent` (None: `scoring.exclude_recent`, the rule the evaluator applied);
        an unknown user gets its no-history encoding when a cold-start encoder is set."""
        self._check_k(k)
        _check_id(user_id)
        exclude_recent = self.scoring.exclude_recent if exclude_recent is None else exclude_recent
        with self.lock:
            slot = self._find(Kind.USER, user_id)
            if slot >= 0:
                exclude = self._recent(Kind.USER, slot) if exclude_recent else np.zeros(0, np.int64)
                results = self._rank_items(self._vector(Kind.USER, slot), k, exclude)
                return Recommendations(results, cold_start=False, snapshot_seq=self.snapshot_seq)
        if self.cold_start is None:
            raise NotFound(f"unknown user id {_quote(user_id)}")
        query = self.cold_start(user_id)  # the encoder runs outside the lock
        with self.lock:
            results = self._rank_items(query, k, np.zeros(0, np.int64))
        return Recommendations(results, cold_start=True, snapshot_seq=self.snapshot_seq)

    def top_k_items(self, user_id: str, k: int = 10, exclude_recent: bool | None = None) -> list[Scored]:
        """`recommend(...).results`."""
        return self.recommend(user_id, k, exclude_recent).results

    def similar_items(self, item_id: str, k: int = 10) -> list[Scored]:
        """Items by cosine to the item's vector, the item itself left out."""
        return self._similar(Kind.ITEM, item_id, k)

    def similar_users(self, user_id: str, k: int = 10) -> list[Scored]:
        """Users by cosine to the user's vector, the user itself left out."""
        return self._similar(Kind.USER, user_id, k)

    def vectors(self, kind: Kind | str, ids: Sequence[str]) -> dict[str, list[float]]:
        """Raw encoder vectors of `ids` (all must exist: a partial answer would hide typos)."""
        kind = Kind(kind)
        if len(ids) > MAX_IDS:
            raise TooLarge(f"at most {MAX_IDS} ids per request, got {len(ids)}")
        for external in ids:
            _check_id(external)
        with self.lock:
            table = self.store.tables[kind]
            slots = table.ids.lookup(list(ids))
            slots[slots >= self._committed(kind)] = -1
            missing = [i for i, s in zip(ids, slots) if s < 0]
            if missing:
                raise NotFound(f"unknown {kind.value} id(s): {_preview(missing)}")
            values = table.read(slots).raw()
        return {external: row.tolist() for external, row in zip(ids, values)}

    def sizes(self) -> dict[str, int]:
        with self.lock:
            return {"users": self._committed(Kind.USER), "items": self._committed(Kind.ITEM)}

    def catalog(self) -> CatalogInfo:
        """Sizes plus where the data came from (snapshot seq/time, or live when None)."""
        backend = self.store.items.vectors
        return CatalogInfo(**self.sizes(), dim=self.store.dim, history_len=self.store.history_len,
                           index_type=backend.index_type,
                           snapshot_seq=self.snapshot_seq, snapshot_created_at=self.snapshot_created_at,
                           popularity_weight=self.scoring.popularity_weight,
                           popularity_halflife=self.store.items.history.halflife,
                           exclude_recent=self.scoring.exclude_recent)

    # -- writer hooks --

    def note_batch_applied(self, arrival_times: Iterable[float], now: float | None = None) -> np.ndarray:
        """Worker hook, called once a batch is applied and the lock released: records freshness and
        brings the popular-items list up to date (so queries do not pay for it)."""
        if self.scoring.popularity_weight:
            with self.lock:
                self._refresh_popular()
        return self.freshness.record(arrival_times, now)

    def note_snapshot(self, seq: int, created_at: str | None) -> None:
        """Worker hook: the newest durable snapshot (shown by /v1/catalog and /metrics)."""
        self.snapshot_seq, self.snapshot_created_at = seq, created_at

    # -- internals (callers hold the lock) --

    def _rank_items(self, query: np.ndarray, k: int, exclude: np.ndarray) -> list[Scored]:
        exclude = np.concatenate([exclude, self._pending(Kind.ITEM)])
        weight = self.scoring.popularity_weight
        if not weight:
            return self._scored(Kind.ITEM, *self._cosine(Kind.ITEM, query, k, exclude))
        self._refresh_popular()
        scores, slots = served_top_k(
            query, k, weight, exclude=exclude, history=self.store.items.history, n_items=self._committed(Kind.ITEM),
            popular=self.popular, cosine_search=lambda fetch: self._cosine(Kind.ITEM, query, fetch, exclude),
            raw_vectors=lambda slots: self._raw(Kind.ITEM, slots))
        return self._scored(Kind.ITEM, scores, slots)

    def _refresh_popular(self) -> None:
        self.popular.refresh(self.store.items.history, self._committed(Kind.ITEM))

    def _similar(self, kind: Kind, external: str, k: int) -> list[Scored]:
        self._check_k(k)
        _check_id(external)
        with self.lock:
            slot = self._slot(kind, external)
            exclude = np.concatenate([np.asarray([slot], dtype=np.int64), self._pending(kind)])
            return self._scored(kind, *self._cosine(kind, self._vector(kind, slot), k, exclude))

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.max_k:
            raise InvalidRequest(f"k must be in [1, {self.max_k}], got {k}")

    def _committed(self, kind: Kind) -> int:
        """Slots [0, n) are served: written by the writer (see the class docstring)."""
        n = len(self.store.tables[kind].ids)
        return n if self.committed_sizes is None else min(n, int(self.committed_sizes()[kind]))

    def _pending(self, kind: Kind) -> np.ndarray:
        """Slots registered by a batch that is still being encoded: never returned."""
        return np.arange(self._committed(kind), len(self.store.tables[kind].ids), dtype=np.int64)

    def _find(self, kind: Kind, external: str) -> int:
        slot = int(self.store.tables[kind].ids.lookup([external])[0])
        return slot if slot < self._committed(kind) else -1

    def _slot(self, kind: Kind, external: str) -> int:
        slot = self._find(kind, external)
        if slot < 0:
            raise NotFound(f"unknown {kind.value} id {_quote(external)}")
        return slot

    def _vector(self, kind: Kind, slot: int) -> np.ndarray:
        return self._raw(kind, np.asarray([slot], dtype=np.int64))[0]

    def _raw(self, kind: Kind, slots: np.ndarray) -> np.ndarray:
        """(n, D) stored vectors of `slots` as numpy (the FAISS backend skips torch: query path);
        a capped table reads spilled ones from their files, without restoring them."""
        return self.store.tables[kind].vectors.rows(slots)

    def _recent(self, kind: Kind, slot: int) -> np.ndarray:
        """Slots of the other kind in the entity's last-L history (what it already interacted with)."""
        data = self.store.tables[kind].read(np.asarray([slot]))
        n = int(data.lengths[0])
        return data.rows[0, data.rows.shape[1] - n:].copy() if n else np.zeros(0, np.int64)

    def _cosine(self, kind: Kind, query: np.ndarray, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, slots) of the k best cosines, -1 padded; from the FAISS index or an exact scan."""
        vectors = self.store.tables[kind].vectors  # a capped table ranks its resident entities only
        scores, slots = vectors.search(query[None, :], k, exclude=[exclude], limit=self._committed(kind))
        return scores[0], slots[0]

    def _scored(self, kind: Kind, scores: np.ndarray, slots: np.ndarray) -> list[Scored]:
        keep = (slots >= 0) & np.isfinite(scores)
        names = self.store.tables[kind].ids.names(slots[keep])
        return [Scored(name, float(score)) for name, score in zip(names, scores[keep])]


def _check_id(external: str) -> None:
    """Ids the topic would reject (empty, control characters, over 256 characters) can name nothing:
    422 with the reason, never a (cold-start) answer that echoes them."""
    problem = id_problem(external)
    if problem is not None:
        raise InvalidRequest(f"invalid id: {problem.removeprefix('field ').removeprefix(repr('id') + ' ')}")


def _preview(ids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(_quote(i) for i in ids[:limit])
    return shown + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def _quote(text: str) -> str:
    """repr of an untrusted string, cut to MAX_ECHO_CHARS: an error must not echo megabytes."""
    return repr(text) if len(text) <= MAX_ECHO_CHARS else f"{text[:MAX_ECHO_CHARS]!r}... ({len(text)} characters)"



class ColdStartEncoder:
    """An unknown user's query vector: the encoding of its empty history (`engine.cold_vectors`),
    what the evaluator scores a new user's first event with. Needs the model: `consume --serve` only."""

    def __init__(self, model: Any, cache: CacheConfig) -> None:
        self.model, self.cache = model, cache

    def __call__(self, user_id: str) -> np.ndarray:
        return cold_vectors(self.model, Kind.USER, [user_id], self.cache)[0].cpu().numpy()

