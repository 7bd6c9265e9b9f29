"""Query service: the read side of the representation store for downstream services.

Pieces, from the inside out:

- `QueryEngine` answers top-k recommendations, similar items/users and raw vectors from one
  `RepresentationStore`. Every read holds the *same* lock the streaming worker holds while it
  applies a micro-batch, so a query never sees half a batch (a user's vector from after the batch
  with item vectors from before it). FAISS-backed stores are searched through
  `ShardedFaissVectors.search` (exact or ANN, as configured); any other backend gets an exact
  cosine scan with the same ordering (score desc, slot asc), so results never depend on the backend.
  With a capped store (cache.max_entities) searches rank the entities held in memory only (plus,
  with a popularity prior, the most popular items, read from their files when spilled), while
  point reads (the query entity's vector and history, `/v1/vectors`) come from `EntityTable.read`,
  which serves spilled entities from their Parquet files without bringing them back into memory.
- `create_app(engine_provider)` is the FastAPI app. The provider is called once per request, so
  the standalone server can swap in a new engine (a newer snapshot) by reassigning one reference:
  a request in flight keeps the engine it started with, nothing is ever half-swapped.
- `serve_in_thread` runs uvicorn in a daemon thread (`consume --serve`, tests);
  `run_server` runs it in the main thread (the `serve` command, so SIGTERM stops it cleanly).
- `SnapshotFollower` polls a snapshot root written by the worker, builds a complete engine from the
  newest valid snapshot off to the side, then swaps it in. It swaps to higher seqs of the same
  lineage and to any seq of a new lineage (a worker that started over, e.g. after `--reset-state`
  or a wiped directory); a snapshot that fails to load is skipped for the previous one.

Limits (untrusted clients): request bodies above `MAX_BODY_BYTES` and more than `MAX_IDS` ids get
413; error messages quote at most `MAX_ECHO_CHARS` characters of any id and never echo a body.

Snapshot layout read here (the worker writes it; `snapshot_state` builds it):
`SnapshotManager.write_state({"store": store.state_dict(), ...anything else},
meta={"cache": to_dict(cache_config), ...})`. A state that *is* a store state_dict (keys dim,
history_len, users, items) is accepted too, and the cache config may also sit under
meta["config"]["cache"] / meta["configs"]["cache"]; missing -> CacheConfig() defaults.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from pydantic import BaseModel, Field

from felrec_stream import __version__
from felrec_stream.config import CacheConfig, ScoringConfig, from_dict, to_dict
from felrec_stream.errors import ServiceError
from felrec_stream.log import get_logger
from felrec_stream.serving.ranking import PopularItems, served_top_k
from felrec_stream.serving.schema import CatalogInfo, Recommendations, Scored
from felrec_stream.state.engine import cold_vectors
from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.snapshot import Snapshot, SnapshotManager
from felrec_stream.state.spill import SPILL_DIR
from felrec_stream.state.store import Kind, RepresentationStore, exact_top_k  # noqa: F401 (was defined here)

log = get_logger(__name__)

MAX_K = 1000  # larger k is a bulk export, not a query: use `felrec-stream export`
MAX_IDS = 1000  # ids per POST /v1/vectors
MAX_BODY_BYTES = 1 << 20  # 1000 ids of 256 characters fit several times over
MAX_ECHO_CHARS = 64  # of an id quoted in an error message
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class NotFound(ServiceError):
    """An id the store has never seen (HTTP 404)."""


class InvalidRequest(ServiceError):
    """A query outside the service's limits (HTTP 422)."""


class NotReady(ServiceError):
    """No store is loaded yet (HTTP 503)."""


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


def _preview(ids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(_quote(i) for i in ids[:limit])
    return shown + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def _quote(text: str) -> str:
    """repr of an untrusted string, cut to MAX_ECHO_CHARS: an error must not echo megabytes."""
    return repr(text) if len(text) <= MAX_ECHO_CHARS else f"{text[:MAX_ECHO_CHARS]!r}... ({len(text)} characters)"


# ---- snapshots -> store/engine ---------------------------------------------------------------

def snapshot_state(store: RepresentationStore, cache: CacheConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) to pass to SnapshotManager.write_state; the worker adds its own keys to both."""
    return {"store": store.state_dict()}, {"cache": to_dict(cache)}


def cache_config_from_meta(meta: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> CacheConfig:
    """The snapshot's cache config (see module docstring for where it may sit) plus overrides."""
    values: dict[str, Any] = {}
    for holder in (meta, meta.get("config") or {}, meta.get("configs") or {}):
        if isinstance(holder, Mapping) and isinstance(holder.get("cache"), Mapping):
            values = dict(holder["cache"])
            break
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(CacheConfig, values, "cache")


def load_store_from_snapshot(snapshot: Snapshot, cache_overrides: Mapping[str, Any] | None = None,
                             device: torch.device | str = "cpu") -> RepresentationStore:
    """A FAISS-backed RepresentationStore rebuilt from a worker snapshot.

    `cache_overrides` (e.g. {"index_type": "hnsw", "shards": 4}) let a read replica index the same
    vectors differently from the worker; history_len always comes from the stored state.
    """
    state = snapshot.state()
    store_state = state["store"] if "store" in state else state
    if not {"dim", "history_len", "users", "items"} <= set(store_state):
        raise ServiceError(f"snapshot {snapshot.path} holds no representation store state")
    cache = cache_config_from_meta(snapshot.meta, {**dict(cache_overrides or {}),
                                                  "history_len": int(store_state["history_len"])})
    store = make_store(int(store_state["dim"]), cache, device, spill_dir=snapshot.path.parent / SPILL_DIR,
                       spill_read_only=True)
    store.load_state_dict(store_state)
    return store


def scoring_config_from_meta(meta: Mapping[str, Any]) -> ScoringConfig:
    """The scoring config the worker recorded (meta["configs"]["scoring"]); missing -> defaults
    (weight 0: cosine only, as snapshots written before the popularity prior were served)."""
    configs = meta.get("configs") or {}
    values = configs.get("scoring") if isinstance(configs, Mapping) else None
    return from_dict(ScoringConfig, dict(values) if isinstance(values, Mapping) else {}, "scoring")


def engine_from_snapshot(snapshot: Snapshot, cache_overrides: Mapping[str, Any] | None = None) -> QueryEngine:
    """A read replica's engine: no model, so unknown users are 404 (no cold start)."""
    store = load_store_from_snapshot(snapshot, cache_overrides)
    return QueryEngine(store, scoring=scoring_config_from_meta(snapshot.meta), snapshot_seq=snapshot.seq,
                       snapshot_created_at=snapshot.created_at)


class ColdStartEncoder:
    """An unknown user's query vector: the encoding of its empty history (`engine.cold_vectors`),
    what the evaluator scores a new user's first event with. Needs the model: `consume --serve` only."""

    def __init__(self, model: Any, cache: CacheConfig) -> None:
        self.model, self.cache = model, cache

    def __call__(self, user_id: str) -> np.ndarray:
        return cold_vectors(self.model, Kind.USER, [user_id], self.cache)[0].cpu().numpy()


class SnapshotFollower:
    """Serves the newest valid snapshot under `root`, swapping newer ones in as they appear.

    The new engine is built completely before one reference assignment publishes it (atomic in
    CPython), so requests never see a partly loaded store; in-flight requests finish on the old one.
    "Newer" is a higher seq of the served snapshot's lineage, or any seq of another lineage (the
    worker started over: its seqs may even go down). A snapshot that fails to load is logged and
    skipped for the previous one; the directory is examined again only when CURRENT changes.
    """

    def __init__(self, root: str | Path, poll_seconds: float = 2.0,
                 cache_overrides: Mapping[str, Any] | None = None,
                 build: Callable[[Snapshot], QueryEngine] | None = None) -> None:
        self.manager = SnapshotManager(root)
        self.poll_seconds = poll_seconds
        self._build = build or (lambda snap: engine_from_snapshot(snap, cache_overrides))
        self._engine: QueryEngine | None = None
        self._lineage: str | None = None
        self._examined: Any = object()  # the directory state last examined (never equal at first)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0

    def current(self) -> QueryEngine | None:
        """The engine provider for create_app."""
        return self._engine

    @property
    def seq(self) -> int | None:
        engine = self._engine
        return engine.snapshot_seq if engine is not None else None

    def poll_once(self) -> bool:
        """Load and swap in a newer snapshot if there is one; True when a swap happened."""
        marker = self._directory_state()
        if marker == self._examined:
            return False
        self._examined = marker
        start = time.perf_counter()
        found = self.manager.load_newest(self._build, accept=self._is_newer, skip=(Exception,))
        if found is None:
            return False
        (snapshot, engine), previous = found, self.seq
        self._engine, self._lineage = engine, snapshot.lineage
        self.swaps += 1
        log.info("snapshot_swapped", seq=snapshot.seq, previous_seq=previous, lineage=snapshot.lineage,
                 **engine.sizes(), seconds=round(time.perf_counter() - start, 3))
        return True

    def _is_newer(self, seq: int, meta: Mapping[str, Any]) -> bool:
        if self._engine is None:
            return True
        return meta.get("lineage") != self._lineage or seq > (self.seq or 0)

    def _directory_state(self) -> tuple[int | None, int | None]:
        """Cheap (no checksums): CURRENT's seq and the newest directory's seq."""
        return self.manager.current_seq(), max(self.manager.snapshots(), default=None)

    def start(self) -> "SnapshotFollower":
        self._thread = threading.Thread(target=self._run, name="felrec-snapshot-follower", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
            except Exception as exc:  # never let the follower thread die silently
                log.error("snapshot_poll_failed", error=str(exc))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.poll_seconds))


# ---- HTTP API --------------------------------------------------------------------------------

class ScoredOut(BaseModel):
    id: str
    score: float = Field(description="recommendations: cosine + popularity_weight * log(1 + popularity) "
                                     "(see /v1/catalog); similar: cosine similarity in [-1, 1]")


class ResultsOut(BaseModel):
    query_id: str
    kind: Literal["user", "item"] = Field(description="kind of the returned entities")
    k: int
    results: list[ScoredOut]
    snapshot_seq: int | None = None
    cold_start: bool = Field(False, description="recommendations for an unknown user, from the encoding of an "
                                                "empty history (only where the model runs in-process)")


class VectorsIn(BaseModel):
    kind: Kind
    ids: list[str] = Field(min_length=1, description=f"1..{MAX_IDS} ids (more: 413)")


class VectorsOut(BaseModel):
    kind: Kind
    dim: int
    vectors: dict[str, list[float]]


EngineProvider = Callable[[], "QueryEngine | None"]
KParam = Annotated[int, Query(ge=1, le=MAX_K, description=f"number of results, 1..{MAX_K}")]


def create_app(engine_provider: EngineProvider, title: str = "felrec-stream query API") -> FastAPI:
    """The query API; `engine_provider()` is read once per request (see module docstring)."""
    registry = CollectorRegistry()
    latency = Histogram("felrec_http_request_duration_seconds", "HTTP request latency by route template",
                        ["method", "route", "status"], registry=registry, buckets=LATENCY_BUCKETS)
    registry.register(_EngineCollector(engine_provider))
    app = FastAPI(title=title, version=__version__,
                  description="Top-k recommendations and similarities from FELRec representations.")
    app.add_middleware(_LatencyMiddleware, histogram=latency)
    app.add_middleware(_BodyLimitMiddleware, limit=MAX_BODY_BYTES)
    _add_error_handlers(app)
    _add_query_routes(app, engine_provider)
    _add_ops_routes(app, engine_provider, registry)
    return app


def _engine(provider: EngineProvider) -> QueryEngine:
    engine = provider()
    if engine is None:
        raise NotReady("no representation store loaded yet")
    return engine


def _results(engine: QueryEngine, query_id: str, kind: Kind, k: int, results: list[Scored],
             cold_start: bool = False) -> ResultsOut:
    return ResultsOut(query_id=query_id, kind=kind.value, k=k, snapshot_seq=engine.snapshot_seq,
                      results=[ScoredOut(id=r.id, score=r.score) for r in results], cold_start=cold_start)


def _add_query_routes(app: FastAPI, provider: EngineProvider) -> None:
    # {id:path}: ids may contain '/', sent percent-encoded by FelrecClient.
    @app.get("/v1/users/{user_id:path}/recommendations", response_model=ResultsOut, tags=["query"])
    def recommendations(user_id: str, k: KParam = 10, exclude_recent: bool | None = None) -> ResultsOut:
        """Top-k items for a user by the served score (cosine + popularity prior, as evaluated);
        `exclude_recent` drops items in its last-L history (default: the snapshot's
        scoring.exclude_recent, as evaluated). An unknown user is 404, or, where the
        model runs in-process (`consume --serve`), ranked from an empty history with cold_start=true."""
        engine = _engine(provider)
        answer = engine.recommend(user_id, k, exclude_recent)
        return _results(engine, user_id, Kind.ITEM, k, answer.results, answer.cold_start)

    @app.get("/v1/items/{item_id:path}/similar", response_model=ResultsOut, tags=["query"])
    def similar_items(item_id: str, k: KParam = 10) -> ResultsOut:
        """Items most similar to an item (itself excluded)."""
        engine = _engine(provider)
        return _results(engine, item_id, Kind.ITEM, k, engine.similar_items(item_id, k))

    @app.get("/v1/users/{user_id:path}/similar", response_model=ResultsOut, tags=["query"])
    def similar_users(user_id: str, k: KParam = 10) -> ResultsOut:
        """Users most similar to a user (itself excluded)."""
        engine = _engine(provider)
        return _results(engine, user_id, Kind.USER, k, engine.similar_users(user_id, k))

    @app.post("/v1/vectors", response_model=VectorsOut, tags=["query"])
    def vectors(body: VectorsIn) -> VectorsOut:
        """Raw representation vectors; 404 when any id is unknown."""
        engine = _engine(provider)
        return VectorsOut(kind=body.kind, dim=engine.store.dim, vectors=engine.vectors(body.kind, body.ids))

    @app.get("/v1/catalog", response_model=CatalogInfo, tags=["query"])
    def catalog() -> CatalogInfo:
        """Entity counts and the snapshot being served."""
        return _engine(provider).catalog()


def _add_ops_routes(app: FastAPI, provider: EngineProvider, registry: CollectorRegistry) -> None:
    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "no store loaded yet"}})
    def readyz() -> Response:
        """Readiness: a store is loaded and queries can be answered."""
        engine = provider()
        if engine is None:
            return JSONResponse({"status": "not_ready"}, status_code=503)
        return JSONResponse({"status": "ready", "snapshot_seq": engine.snapshot_seq, **engine.sizes()})

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _add_error_handlers(app: FastAPI) -> None:
    for error, status in ((NotFound, 404), (InvalidRequest, 422), (NotReady, 503), (TooLarge, 413)):
        def handler(request: Request, exc: Exception, status: int = status) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status)
        app.add_exception_handler(error, handler)
    app.add_exception_handler(RequestValidationError, _validation_error)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 with where and what (FastAPI's default also echoes the offending input: not here)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": list(e.get("loc", ()))[:5], "msg": str(e.get("msg", ""))[:200], "type": e.get("type")}
              for e in errors[:10]]
    return JSONResponse({"detail": detail}, status_code=422)


class _BodyLimitMiddleware:
    """Pure ASGI: bodies above `limit` bytes get 413 before the app parses anything.

    A declared Content-Length over the limit is refused unread; otherwise the body is read here
    (at most limit + one chunk) and handed to the app in one message.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._refuse(scope, send)
                return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    async def _refuse(self, scope: dict, send: Any) -> None:
        response = JSONResponse({"detail": f"request body larger than {self.limit} bytes"}, status_code=413)
        await response(scope, _never, send)


def _replay(messages: list[dict], receive: Any) -> Any:
    async def replayed() -> dict:
        return messages.pop(0) if messages else await receive()
    return replayed


async def _never() -> dict:
    return {"type": "http.disconnect"}


class _LatencyMiddleware:
    """Pure ASGI middleware: latency per route *template* (bounded label set), method and status."""

    def __init__(self, app: Any, histogram: Histogram) -> None:
        self.app, self.histogram = app, histogram

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the router fills scope["route"]
            self.histogram.labels(scope["method"], route, str(status[0])).observe(time.perf_counter() - start)


class _EngineCollector:
    """Gauges read from the current engine at scrape time (so a swapped engine is reported)."""

    def __init__(self, provider: EngineProvider) -> None:
        self.provider = provider

    def describe(self) -> list:
        return []  # no collect() at registration: the engine may not exist yet

    def collect(self) -> Iterable[Any]:
        engine = self.provider()
        yield GaugeMetricFamily("felrec_ready", "1 when a store is loaded", value=float(engine is not None))
        if engine is None:
            return
        entities = GaugeMetricFamily("felrec_entities", "entities in the store", labels=["kind"])
        for kind, n in engine.sizes().items():
            entities.add_metric([kind], float(n))
        yield entities
        yield from _snapshot_metrics(engine)
        yield from _freshness_metrics(engine.freshness)


def _snapshot_metrics(engine: QueryEngine) -> Iterable[Any]:
    if engine.snapshot_seq is None:
        return
    yield GaugeMetricFamily("felrec_snapshot_seq", "seq of the snapshot being served", value=engine.snapshot_seq)
    try:
        created = datetime.fromisoformat(engine.snapshot_created_at or "").timestamp()
    except ValueError:  # a malformed time must not break the whole scrape
        return
    yield GaugeMetricFamily("felrec_snapshot_age_seconds", "age of the snapshot being served",
                            value=time.time() - created)


def _freshness_metrics(freshness: FreshnessTracker) -> Iterable[Any]:
    buckets, total, n = freshness.histogram()
    if freshness.last_max is not None:
        yield GaugeMetricFamily("felrec_freshness_seconds",
                                "seconds from arrival to queryable of the oldest event of the last applied batch",
                                value=freshness.last_max)
    yield HistogramMetricFamily("felrec_event_freshness_seconds",
                                "seconds from an event's arrival to it being queryable",
                                buckets=buckets, sum_value=total)


# ---- servers ---------------------------------------------------------------------------------

@dataclass
class ServerHandle:
    """A uvicorn server running in a daemon thread; `stop()` shuts it down gracefully."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)
        log.info("api_stopped", url=self.url)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    """Bind here (not in uvicorn) so errors surface in the caller and port 0 picks a free port."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServiceError(f"cannot bind {host}:{port}: {exc}") from None
    return sock


def _server(app: FastAPI, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level=log_level, access_log=False, log_config=None, lifespan="off")
    return uvicorn.Server(config)


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 8080, *,
                    startup_timeout: float = 15.0, log_level: str = "warning") -> ServerHandle:
    """Start `app` on host:port (0 = any free port) in a daemon thread; returns once it accepts."""
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    server = _server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"felrec-api-{bound_port}")
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ServiceError(f"query API on {host}:{bound_port} did not start within {startup_timeout}s")
        time.sleep(0.01)
    handle = ServerHandle(server, thread, host, bound_port)
    log.info("api_started", url=handle.url)
    return handle


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning") -> None:
    """Serve in the calling (main) thread until SIGINT/SIGTERM; SIGTERM ends with exit status 0.

    uvicorn shuts down gracefully on the signal and then re-raises it against the previous
    handler; the default SIGTERM handler would kill the process (status -15) before our cleanup,
    so a no-op handler is installed for the duration (a container stop is a normal shutdown).
    """
    sock = _bind(host, port)
    log.info("api_started", url=f"http://{host}:{sock.getsockname()[1]}")
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        _server(app, log_level).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("api_stopped", host=host, port=port)
