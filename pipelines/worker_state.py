"""The worker's durable state: what a snapshot holds, how it is written, and how it is restored.

A snapshot (`felrec_stream.state.snapshot.SnapshotManager`: fsynced files, checksummed manifest,
atomic CURRENT switch, newest K kept) holds the store, the positions after the last applied event,
the counters (`Progress`) and the model the store was written with (its version hash and, with
online learning, the history of adopted weight versions: pipelines/versions.py).

Restore rules (`WorkerSnapshots.restore`)
-----------------------------------------
- One writer per snapshot directory, for the worker's whole life (`SnapshotManager.acquire` in
  `run`, which first checks that the directory is writable: a bad one fails before any event).
- The newest snapshot that verifies (checksummed files *and* manifest) and whose state loads is
  used; a damaged one is skipped for the previous one.
- A snapshot holds the topic's identity (`Source.identity()`): restoring it on a topic that was
  deleted and refilled under the same name is refused, since its offsets point into other data.
- Snapshots were committed but none is usable: the worker starts from the beginning with an
  error-level log line, and refuses when the topic no longer starts at offset 0 (retention deleted
  events the lost state held).
- A snapshot of a capped store (`cache.max_entities`) is refused by a worker without a cap (its
  spilled entities exist only in its spill files): an error, nothing discarded or pruned.
- `reset_state` (`--reset-state`): in the two refusals above, discard the snapshots and start from
  the beginning (earliest available offsets) instead. A usable snapshot is always restored.
- Every snapshot carries a `lineage` id, new whenever the worker starts without restoring one, so
  read replicas (`serve`) notice a directory that was reset even when its seq numbers went down.
- The model: the worker's `accept_model` hook decides (same version, a published version the
  snapshot names, or a refusal); see `StreamWorker._accept_model`.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from felrec_stream.config import WorkerConfig, to_dict
from felrec_stream.errors import ConfigError, StoreError
from felrec_stream.faults import fault_point
from felrec_stream.log import get_logger
from felrec_stream.state.meta import ModelSwap, SnapshotMeta
from felrec_stream.state.snapshot import Snapshot, SnapshotCorrupt, SnapshotManager
from felrec_stream.state.spill import SPILL_DIR
from felrec_stream.state.store import RepresentationStore
from felrec_stream.stream.messages import PoisonMessage
from felrec_stream.stream.source import DeadLetterSink, Source
from pipelines.model import ModelBundle

log = get_logger(__name__)

SNAPSHOT_KIND = "felrec-worker"
SNAPSHOT_FORMAT = 1


@dataclass
class Progress:
    """Counters that travel inside every snapshot (absolute since the topic start)."""

    applied: int = 0
    batches: int = 0
    dead_letters: int = 0
    late: int = 0
    offsets: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Restored:
    """What `restore` found: the counters, the snapshot's seq and lineage, its metadata."""

    progress: Progress
    seq: int
    lineage: str
    meta: SnapshotMeta
    extra: Mapping[str, Any]  # what `write(..., extra=)` stored beside the store


class CountingDeadLetters:
    """Dead-letter sink wrapper that remembers where each poison message sat, for exact counts.

    Dead letters are sent when a message is *fetched*, which can be ahead of the positions a
    snapshot stores (events still in the merge buffer). Counting only those behind the stored
    positions (`settle`) makes the snapshot's count exact across crashes: the ones ahead are read,
    sent and counted again after a restart. The inner sink is created on the first poison message.
    """

    def __init__(self, make_inner: Callable[[], DeadLetterSink]) -> None:
        self._make_inner: Callable[[], DeadLetterSink] = make_inner
        self._inner: DeadLetterSink | None = None
        self.sent = 0  # this run
        self.settled = 0  # this run, behind the positions of the latest settle()
        self._ahead: list[tuple[int, int]] = []  # (partition, offset) not yet behind a position

    def send(self, poison: PoisonMessage) -> None:
        if self._inner is None:
            self._inner = self._make_inner()
        self._inner.send(poison)
        fault_point("dead_letter_sent")
        self.sent += 1
        self._ahead.append((-1 if poison.partition is None else poison.partition,
                            -1 if poison.offset is None else poison.offset))

    def flush(self) -> None:
        if self._inner is not None:
            self._inner.flush()

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()

    def settle(self, positions: Mapping[int, int]) -> int:
        """Dead letters of this run behind `positions` (cumulative)."""
        behind = [(p, o) for p, o in self._ahead if o < positions.get(p, -1)]
        self._ahead = [(p, o) for p, o in self._ahead if o >= positions.get(p, -1)]
        self.settled += len(behind)
        return self.settled


class WorkerSnapshots:
    """Writes the worker's snapshots and restores the newest usable one (rules: module docstring).

    `lock` is the query lock: restoring swaps the store's content under it. `accept_model(meta,
    path)` is called for every candidate snapshot before its store loads: it raises to refuse.
    """

    def __init__(self, manager: SnapshotManager, store: RepresentationStore, source: Source, config: WorkerConfig,
                 lock: threading.RLock, dead_letters: CountingDeadLetters | None = None) -> None:
        _check_spill_dir(store, manager)
        self.manager, self.store, self.source, self.config = manager, store, source, config
        self.lock, self.dead_letters = lock, dead_letters
        self.lineage = uuid.uuid4().hex[:16]  # a new history unless a snapshot is restored
        self.dlq_restored = 0
        self._extra: dict[str, Any] = {}

    # -- writing --

    def meta(self, progress: Progress, bundle: ModelBundle, dead_seen: int,
             model_versions: Sequence[ModelSwap] = ()) -> SnapshotMeta:
        """The snapshot's metadata (the worker's restore, serving and `export` parse it)."""
        dead = self.dlq_restored + (self.dead_letters.settle(progress.offsets) if self.dead_letters is not None
                                    else dead_seen)
        return SnapshotMeta(
            kind=SNAPSHOT_KIND, format=SNAPSHOT_FORMAT, topic=self.config.topic, lineage=self.lineage,
            topic_identity=self.source.identity(), offsets=dict(progress.offsets), applied_events=progress.applied,
            batches=progress.batches, dead_letters=dead, late_events=progress.late,
            batch_size=self.config.batch_size, model_version=bundle.version, checkpoint=bundle.path,
            cache=to_dict(bundle.cache),  # as run (shards, index); serving reads it
            configs={k: to_dict(getattr(bundle.configs, k)) for k in ("encoder", "model", "cache", "scoring")},
            model_versions=tuple(model_versions))

    def write(self, meta: SnapshotMeta, check: Callable[[dict[str, Any]], None] | None = None,
              extra: Mapping[str, Any] | None = None) -> Path:
        """Durably write the store with `meta`, then delete spill files nothing refers to any more.

        No query lock: the caller is the store's only writer and runs between batches, so the copy
        cannot be torn; holding the lock would stall queries for the whole copy (~1 s at 1M)."""
        state = {"store": self.store.state_dict(), **dict(extra or {})}
        if check is not None:
            check(state["store"])  # data-parallel: what is written is every rank's state
        refs = {f"{SPILL_DIR}/{name}": info for name, info in self.store.spill_refs().items()}
        path = self.manager.write_state(state, meta.to_dict(), refs=refs)
        self.collect_spill()
        return path

    def collect_spill(self) -> None:
        """Delete spill files that neither the live store nor a kept snapshot refers to."""
        if self.store.spill is None:
            return
        prefix = f"{SPILL_DIR}/"
        protected = {ref[len(prefix):] for ref in self.manager.referenced() if ref.startswith(prefix)}
        with self.lock:
            self.store.collect_spill(protected)

    # -- restoring --

    def restore(self, accept_model: Callable[[SnapshotMeta, Path], None]) -> Restored | None:
        """Load the newest usable snapshot into the (empty) store; None: start from the beginning."""
        self._accept_model = accept_model
        found = self.manager.load_newest(self._load_snapshot)
        if found is not None and found[1] is not None:
            snapshot, why = found
            self._refuse_or_reset(f"topic {self.config.topic!r} is not the topic snapshot {snapshot.path} was "
                                  f"made from: {why}")
            found = None
        if found is None:
            self._check_fresh_start()
            return None
        snapshot = found[0]
        meta = SnapshotMeta.from_dict(snapshot.meta)
        progress = Progress(meta.applied_events, meta.batches, meta.dead_letters, meta.late_events,
                            dict(meta.offsets))
        self.lineage = snapshot.lineage or self.lineage
        self.dlq_restored = progress.dead_letters
        self.collect_spill()  # files a crashed run wrote after this snapshot
        log.info("worker_restored", seq=snapshot.seq, applied=progress.applied, offsets=progress.offsets,
                 users=len(self.store.users), items=len(self.store.items), lineage=self.lineage)
        return Restored(progress, snapshot.seq, self.lineage, meta, self._extra)

    def _load_snapshot(self, snapshot: Snapshot) -> str | None:
        """Check a snapshot, then load its store; returns why the topic differs (nothing loaded then).

        Wrong kind/topic name/model raise (the operator must decide); a state that does not load
        raises SnapshotCorrupt, so the previous snapshot is tried.
        """
        self._check_snapshot(snapshot)
        why = self.source.verify_identity(SnapshotMeta.from_dict(snapshot.meta).topic_identity)
        if why is not None:
            return why
        try:
            state = snapshot.state()
            with self.lock:
                self.store.load_state_dict(state["store"])
            self._extra = {k: v for k, v in state.items() if k != "store"}
        except StoreError as exc:
            raise SnapshotCorrupt(f"its store state does not load: {exc}") from None
        return None

    def _check_fresh_start(self) -> None:
        """No snapshot to restore. Committed ones that are all unusable mean the state is lost:
        loud, and refused when the topic no longer starts at offset 0 (unless reset_state)."""
        if not self.manager.has_committed():
            return
        lost = {p: o for p, o in self.source.earliest_positions().items() if o > 0}
        log.error("snapshots_unusable", root=str(self.manager.root), earliest_offsets=lost or None,
                  action="discarding them" if lost and self.config.reset_state else
                  "applying the topic again from its beginning")
        if lost:
            self._refuse_or_reset(f"no snapshot under {self.manager.root} is usable and topic "
                                  f"{self.config.topic!r} no longer starts at offset 0 (earliest offsets {lost}): "
                                  "the events before them are gone")

    def _refuse_or_reset(self, problem: str) -> None:
        if not self.config.reset_state:
            raise StoreError(f"{problem}; to discard the snapshots and start from the earliest available offsets, "
                             "run once with --reset-state (or use another --snapshot-dir)")
        log.warning("worker_state_reset", problem=problem)
        self.manager.discard_all()

    def _check_snapshot(self, snapshot: Snapshot) -> None:
        meta = SnapshotMeta.from_dict(snapshot.meta)
        if meta.kind != SNAPSHOT_KIND or meta.format != SNAPSHOT_FORMAT:
            raise StoreError(f"{snapshot.path} is not a worker snapshot (kind={meta.kind!r}, format={meta.format!r})")
        if meta.topic != self.config.topic:
            raise StoreError(f"snapshot {snapshot.path} was made from topic {meta.topic!r}, not "
                             f"{self.config.topic!r}: use another --snapshot-dir per topic")
        capped = int((meta.cache or {}).get("max_entities") or 0)
        if capped and self.store.spill is None:  # its spilled entities live only in its spill files
            raise ConfigError(f"snapshot {snapshot.path} was written with cache.max_entities={capped}: restart "
                              f"with --max-entities {capped} (spilled entities are read back from "
                              f"{self.manager.root / SPILL_DIR}), or use another --snapshot-dir")
        self._accept_model(meta, snapshot.path)
        if meta.batch_size != self.config.batch_size:
            log.warning("snapshot_batch_size_changed", old=meta.batch_size, new=self.config.batch_size,
                        hint="batch boundaries differ from the run that wrote the snapshot")


def _check_spill_dir(store: RepresentationStore, snapshots: SnapshotManager) -> None:
    """A capped store that is snapshotted must spill into <snapshot root>/spill (manifest refs)."""
    if store.spill is None:
        return
    expected = (snapshots.root / SPILL_DIR).resolve()
    if store.spill.directory.resolve() != expected:
        raise ConfigError(f"a store with cache.max_entities must spill into {expected} to be snapshotted "
                          f"(make_store(..., spill_dir=...)), not {store.spill.directory}")
