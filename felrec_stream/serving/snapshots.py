"""The snapshot reader: serve replicas read (and follow) the snapshot directories the worker writes.

- `load_store_from_snapshot` rebuilds a FAISS-backed store from one snapshot (spilled entities
  stay in the snapshot root's spill files, opened read-only); `engine_from_snapshot` wraps it in a
  `QueryEngine` pinned to that snapshot (its seq and creation time are what /v1/catalog and
  /metrics report, its recorded scoring config is what it ranks by).
- `SnapshotFollower` polls a snapshot root, builds a complete engine from the newest valid
  snapshot off to the side, then swaps it in. It swaps to higher seqs of the same lineage and to
  any seq of a new lineage (a worker that started over, e.g. after `--reset-state` or a wiped
  directory); a snapshot that fails to load is skipped for the previous one.

Snapshot layout read here (the worker writes it; `snapshot_state` builds it):
`SnapshotManager.write_state({"store": store.state_dict(), ...anything else},
meta=SnapshotMeta(cache=to_dict(cache_config), ...).to_dict())`. A state that *is* a store
state_dict (keys dim, history_len, users, items) is accepted too. Every meta is parsed through
`state.meta.SnapshotMeta.from_dict` (where the cache config may sit in older snapshots, defaults).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from felrec_stream.config import CacheConfig, to_dict
from felrec_stream.errors import ServiceError
from felrec_stream.log import get_logger
from felrec_stream.serving.query import ColdStartEncoder, QueryEngine
from felrec_stream.state.checkpoint import model_from
from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.meta import SnapshotMeta
from felrec_stream.state.snapshot import Snapshot, SnapshotManager
from felrec_stream.state.spill import SPILL_DIR
from felrec_stream.state.store import RepresentationStore
from felrec_stream.state.versions import VersionStore, model_version

log = get_logger(__name__)


def snapshot_state(store: RepresentationStore, cache: CacheConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) to pass to SnapshotManager.write_state; the worker adds its own keys to both."""
    return {"store": store.state_dict()}, SnapshotMeta(cache=to_dict(cache)).to_dict()


def load_store_from_snapshot(snapshot: Snapshot, cache_overrides: Mapping[str, Any] | None = None,
                             device: torch.device | str = "cpu") -> RepresentationStore:
    """A FAISS-backed RepresentationStore rebuilt from a worker snapshot.

    `cache_overrides` (e.g. {"index_type": "hnsw", "shards": 4}) let a read replica index the same
    vectors differently from the worker; history_len always comes from the stored state.
    """
    meta = SnapshotMeta.from_dict(snapshot.meta)
    state = snapshot.state()
    store_state = state["store"] if "store" in state else state
    if not {"dim", "history_len", "users", "items"} <= set(store_state):
        raise ServiceError(f"snapshot {snapshot.path} holds no representation store state")
    cache = meta.cache_config({**dict(cache_overrides or {}), "history_len": int(store_state["history_len"])})
    store = make_store(int(store_state["dim"]), cache, device, spill_dir=snapshot.path.parent / SPILL_DIR,
                       spill_read_only=True)
    store.load_state_dict(store_state)
    if store.spill is not None:  # read the spill files this snapshot verified, even once pruned
        prefix = f"{SPILL_DIR}/"
        store.spill.pin({name[len(prefix):]: handle for name, handle in snapshot.pinned.items()
                         if name.startswith(prefix)})
    return store


def engine_from_snapshot(snapshot: Snapshot, cache_overrides: Mapping[str, Any] | None = None,
                         models: VersionStore | None = None) -> QueryEngine:
    """A read replica's engine, pinned to `snapshot` (its seq, time and recorded scoring config).
    With `models` (online learning's versions) and a snapshot written after a swap, the version the
    snapshot names encodes unknown users (cold start, as `consume --serve`); else they are 404."""
    store = load_store_from_snapshot(snapshot, cache_overrides)
    meta = SnapshotMeta.from_dict(snapshot.meta)
    return QueryEngine(store, scoring=meta.scoring_config(), cold_start=_cold_start(meta, models, store),
                       snapshot_seq=snapshot.seq, snapshot_created_at=snapshot.created_at)


def _cold_start(meta: SnapshotMeta, models: VersionStore | None,
                store: RepresentationStore) -> ColdStartEncoder | None:
    """The encoder of the version `meta` names (the weights that wrote the snapshot's vectors)."""
    if models is None or not meta.model_versions:
        return None
    name = meta.model_versions[-1].version
    checkpoint = models.checkpoint(name)
    if model_version(checkpoint.model_state, checkpoint.configs) != meta.model_version:
        raise ServiceError(f"model version {name} in {models.root} is not the one snapshot meta names "
                           f"({meta.model_version}): another --models-dir?")
    return ColdStartEncoder(model_from(checkpoint, store.device), meta.cache_config())


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
                 build: Callable[[Snapshot], QueryEngine] | None = None, models: VersionStore | None = None) -> None:
        self.manager = SnapshotManager(root, pin_refs=True)
        self.poll_seconds = poll_seconds
        self._build = build or (lambda snap: engine_from_snapshot(snap, cache_overrides, models))
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
        return SnapshotMeta.from_dict(meta).lineage != self._lineage or seq > (self.seq or 0)

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

