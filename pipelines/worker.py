"""The streaming worker: Kafka -> ordered micro-batches -> FELRec encoder -> FAISS store, exactly once.

Every micro-batch goes through the steps of `engine.infer_batch` (the same read/encode/write rules
as training and evaluation) on a `faiss_store.make_store` store, with the trained encoder in eval
mode (the training MLPs are never used), so a user or item gets a representation on its very first
event. The query lock is held only to register new ids and to write the results, never while the
encoder runs (`apply`).

State and positions
-------------------
A snapshot (`felrec_stream.state.snapshot.SnapshotManager`: fsynced files, checksummed manifest,
atomic CURRENT switch, newest K kept) holds, together and only together:

- the store: every vector (unit + norm, bit-exact), every history, count and last-update time,
  the id -> slot maps of users and items;
- per partition, the *next offset* after the last applied event (`KafkaSource.positions()`: events
  still held in the merge buffer or the micro-batcher are not applied, so the position stays at
  or before them; pending dead letters are flushed first);
- the number of events applied since the topic start, batches, dead letters, late events, the
  batch size, and the model version (a hash of the weights and of the configs that shape the
  encoding). A snapshot made with another model version is refused unless `allow_model_change`.

Snapshots are written only *between* micro-batches, every `snapshot_every_events` applied events
or `snapshot_every_seconds`, and once more on a graceful stop (SIGTERM/SIGINT: the current batch is
finished, the final snapshot is written, exit 0). Offsets are committed to the consumer group only
after the snapshot is durable, for monitoring (lag dashboards); they are never read back: the
snapshot is the only source of truth (Kafka transactions are not used, the embedded Tansu broker
cannot do them).

Guarantees
----------
1. Exactly once. After any number of crashes (SIGKILL, power loss after an fsync) and restarts,
   each event of the topic up to the point reached is applied exactly once: a restart restores the
   newest snapshot that verifies (a corrupt or half-written one is skipped for the previous one)
   and seeks every partition to the offsets stored *in* it. Nothing between those offsets and the
   crash survived the crash (store and offsets move together), so nothing is lost or repeated.
2. Identical to an uninterrupted run, bit for bit, in `until_end` mode (`--until-end`). The state
   is a pure function of (model, event order, batch boundaries):
   - order: the source k-way merges the partitions' FIFOs by (timestamp, event_id) and, in this
     mode, releases an event only when every unfinished partition has a queued head: the output
     is a function of the topic content, never of fetch timing;
   - boundaries: batches are cut by count only (no time limit), `batch_size` events each, and
     snapshots (periodic or on SIGTERM) fall between batches, so every snapshot sits at a multiple
     of `batch_size` and a restart continues on the grid of the uninterrupted run; the only short
     batch is the last one, at the end of the topic as captured when the run opened (fixed for a
     topic that is not being written to);
   - `max_events` stops at the first batch boundary at or after that many events (no short batch).
   Same CPU, thread count and library versions are assumed (float reductions); CUDA kernels are
   not guaranteed deterministic. A run that stops at the end of the topic (short last batch) and
   is continued after more events arrive starts a new count grid there: it equals the same
   sequence of clean stops without crashes, not one longer run. The FAISS truth (vectors) is
   restored bit-exactly; ANN side indexes (hnsw/ivf) are rebuilt from it, so approximate search
   results may differ slightly from those of a process that never restarted.
3. Follow mode (default: run forever). Guarantee 1 holds; guarantee 2 does not: a batch is also
   cut when its oldest event has waited `max_wait_ms`, and the source releases events early when
   a partition is idle for `max_delay_s` or the reorder window overflows (`late_events`), so
   boundaries and the cross-partition order then depend on timing.
4. Dead letters are written at least once: poison messages after the restored offsets are sent
   again after a crash. Their count in a snapshot is exact (only those behind the stored offsets
   are counted, see `CountingDeadLetters`); `late_events` is a plain per-run sum (follow mode).
5. Bounded memory (`cache.max_entities`, `consume --max-entities N`): at most N users and N items
   stay in memory (a batch may briefly hold more); the least recently touched spill to immutable,
   content-addressed Parquet files in `<snapshot dir>/spill/` and come back exactly on their next
   use (felrec_stream/state/spill.py). Every snapshot lists the spill files its state refers to
   (manifest refs: size and sha256); after each snapshot the worker deletes only the files that
   neither the live store nor any kept snapshot refers to, so guarantees 1 and 2 hold with a cap:
   the final state equals that of an uncapped run (tests/pipelines/test_worker_spill.py).
6. Every record is one interaction: two records with the same `event_id` (a producer that retried
   without idempotence) are both applied. Producers must be idempotent (replay's is) for
   exactly-once *input*; the worker guarantees exactly-once *processing* of what the topic holds.

Restore rules: pipelines/worker_state.py (`WorkerSnapshots`, which also writes the snapshots).

Several ranks (`consume` under torchrun / `--nproc`): this worker is rank 0 (`ranks`): it alone
reads the source, snapshots and commits, and sends every batch to the followers
(pipelines/replicas.py), each of which encodes a slice of it; all commit the whole batch. The
guarantees above hold unchanged (only rank 0's snapshots exist); a rank that dies stops the job.

The worker reads through the `felrec_stream.stream.source.Source` protocol (`KafkaSource` in
production, `InMemorySource` in tests) and counts dead letters through `CountingDeadLetters`.

Event-to-update latency (metric and `observers`) is wall-clock now minus the event timestamp when
timestamps are wall-clock (the newest event of the batch lies within a day of now). Otherwise
(historical replays) it would be now minus the record timestamp (broker write time), read from
`source.last_batch_record_times_ms()`; `KafkaSource` returns None there yet, so for historical
topics the metric stays empty.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch

from connectors.kafka.dlq import KafkaDeadLetters
from connectors.kafka.source import KafkaSource
from felrec_stream.config import KafkaConfig, WorkerConfig
from felrec_stream.errors import ConfigError, KafkaError, ModelError
from felrec_stream.faults import fault_point
from felrec_stream.log import get_logger
from felrec_stream.parallel import Leader, Ranks
from felrec_stream.state.engine import apply_commit, encode_sequences, infer_encodings, stage_commit, stored_sequences
from felrec_stream.state.meta import ModelSwap, SnapshotMeta
from felrec_stream.state.snapshot import SnapshotManager
from felrec_stream.state.store import Kind, RepresentationStore
from felrec_stream.state.versions import VersionManifest, VersionStore, shape_digest
from felrec_stream.stream.events import EventBatch
from felrec_stream.stream.messages import TS_UNITS
from felrec_stream.stream.source import Source
from pipelines.adoption import VersionAdoption
from pipelines.model import ModelBundle, bundle_from_version, model_and_store, spill_dir_for
from pipelines.prometheus import WorkerMetrics
from pipelines.worker_state import CountingDeadLetters, Progress, WorkerSnapshots

log = get_logger(__name__)

_NO_TIME_LIMIT_S = 1e9  # until_end: batches are cut by count only
_WALL_CLOCK_WINDOW_S = 86_400.0
_HISTORY_KEPT = 100  # model swaps a snapshot remembers


# ---- progress ----------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerResult:
    """What one run did (printed by `felrec-stream consume`)."""

    applied_this_run: int
    applied_total: int
    batches: int
    dead_letters: int
    late_events: int
    snapshots: int
    restored_seq: int | None
    offsets: dict[int, int]
    seconds: float
    events_per_s: float
    stopped_by: str
    users: int
    items: int
    model_version: str  # the published version in use ("" = the checkpoint)


def make_source(kafka_config: KafkaConfig, config: WorkerConfig, **kwargs: Any) -> KafkaSource:
    """The ordered source with the batch rules guarantee 2 needs (count-only cuts in until_end)."""
    max_wait_s = _NO_TIME_LIMIT_S if config.until_end else config.max_wait_ms / 1000
    return KafkaSource(kafka_config, config.topic, until_end=config.until_end, batch_size=config.batch_size,
                       max_wait_s=max_wait_s, group_id=config.group_id or None, **kwargs)


# ---- the worker -------------------------------------------------------------------------------

class WorkerObserver(Protocol):
    """Read-side hooks: called after a batch is applied (lock released) and after a durable snapshot."""

    def note_batch_applied(self, arrival_times: np.ndarray) -> Any: ...  # empty when unknown

    def note_snapshot(self, seq: int, created_at: str | None) -> None: ...


class StreamWorker:
    """Restore -> open the source at the restored offsets -> apply batches -> snapshot -> stop.

    Lifecycle: `run()` once. `request_stop()` may be called from a signal handler or another
    thread: the batch in progress is finished, a final snapshot written, and `run()` returns.
    `lock` serialises store writes against readers (the query service shares it).
    """

    def __init__(self, bundle: ModelBundle, store: RepresentationStore, source: Source, config: WorkerConfig,
                 snapshots: SnapshotManager | None = None, metrics: WorkerMetrics | None = None,
                 lock: Any = None, timestamp_unit: str = "s", dead_letters: CountingDeadLetters | None = None,
                 clock: Callable[[], float] = time.monotonic, ranks: Ranks | None = None) -> None:
        self.bundle, self.store, self.source, self.config = bundle, store, source, config
        self.ranks = ranks  # data-parallel: this is rank 0, the followers apply what it sends (pipelines/replicas.py)
        self.replicas = None if ranks is None else Leader(ranks, self.request_stop)
        self.dead_letters = dead_letters  # the sink the source sends to, for exact counts
        self.snapshots = snapshots
        self.lock = lock if lock is not None else threading.RLock()
        self.state = None if snapshots is None else WorkerSnapshots(snapshots, store, source, config, self.lock,
                                                                    dead_letters)
        self.metrics = metrics or WorkerMetrics()
        self.ts_scale = 1.0 / TS_UNITS[timestamp_unit]
        self.clock = clock
        self.progress = Progress()
        self.restored_seq: int | None = None
        self.lineage: str | None = None  # set by restore(): the restored snapshot's, or a new one
        self.ready = False  # restored and reading: the store may be queried (consume --serve's /readyz)
        self._stop_reason: str | None = None
        self._run_applied = 0
        self._snapshots_written = 0
        self._snapshot_applied = 0
        self._snapshot_time = clock()
        self._seen_poison = 0
        self._seen_late = 0
        self.observers: list[WorkerObserver] = []  # read side, e.g. serving.query.QueryEngine
        self._committed = {Kind.USER: len(store.users), Kind.ITEM: len(store.items)}
        # online learning (pipelines/adoption.py): the published versions and the ones applied so far
        self.versions = VersionStore(config.models_dir) if config.models_dir else None
        self.adoption = None if self.versions is None else VersionAdoption(
            self.versions, shape_digest(bundle.configs), config.until_end)
        self.model_history: list[ModelSwap] = []  # the versions switched to, oldest first (kept in snapshots)
        self._swapped_at = time.time()
        self.stale_share: dict[str, float] = {}
        self._backfilled = np.zeros(1024, dtype=bool)  # item slots re-encoded by `--backfill` since the last swap
        if config.backfill and (ranks is not None or store.spill is not None):
            raise ConfigError("worker.backfill is not supported with data-parallel ranks or cache.max_entities yet")
        if config.backfill and bundle.model.config.cache_update != "post_event":
            raise ConfigError("worker.backfill re-encodes stored histories: it needs model.cache_update=post_event "
                              "(preset serve)")

    def request_stop(self, reason: str = "signal") -> None:
        """Finish the current batch, snapshot, return from run(). Safe in a signal handler."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self.source.stop()

    def run(self) -> WorkerResult:
        started = time.perf_counter()
        if self.snapshots is not None:
            self.snapshots.acquire()  # one writer for the whole life; a bad directory fails here
        try:
            positions = self.restore()
            if self.replicas is not None:  # the followers start from rank 0's restored store
                self.replicas.send("state", self.store.state_dict() if self.restored_seq is not None else None)
            try:
                self.source.open(positions)
                self.ready = True
                log.info("worker_started", topic=self.config.topic, applied=self.progress.applied,
                         batch_size=self.config.batch_size, until_end=self.config.until_end,
                         model_version=self.bundle.version, restored_seq=self.restored_seq, lineage=self.lineage)
                if self.progress.applied:  # a stop may have skipped the check at the restored boundary
                    self.adopt_due_version()
                self._loop()
                self._final_snapshot()
                if self.replicas is not None:  # only after a clean stop: on an error the followers lose rank 0
                    self.replicas.send("stop", self._stop_reason)
            finally:
                self.source.close()  # flushes pending dead letters
                if self.dead_letters is not None:
                    self.dead_letters.close()
        finally:
            if self.snapshots is not None:
                self.snapshots.release()
        return self._result(time.perf_counter() - started)

    @property
    def stopping(self) -> bool:
        return self._stop_reason is not None

    def _loop(self) -> None:
        """Poll with a short timeout (not `source.batches()`) so time-based snapshots also happen
        while the topic is idle and a stop request is seen within ~0.1 s."""
        while self._stop_reason is None:
            if self.source.exhausted:
                self._stop_reason = "end_of_topic"
                return
            batch = self.source.poll_batch(0.1)
            if self.replicas is not None:  # every turn, also idle ones (heartbeat)
                self.replicas.send("idle" if batch is None else "batch", batch)
            if batch is not None:
                self.apply(batch)
                self.adopt_due_version()  # before any snapshot of this boundary (exactly-once swaps)
                if self.config.max_events and self._run_applied >= self.config.max_events:
                    self._stop_reason = self._stop_reason or "max_events"
            if self._stop_reason is None and self._snapshot_due():
                self.snapshot()

    # -- batches --

    def apply(self, batch: EventBatch) -> None:
        """`engine.infer_batch`'s steps with the lock held only to change the store, then counters,
        metrics, observers and `batch_applied`."""
        started = time.perf_counter()
        held = self._apply_batch(batch)  # takes the lock itself, twice, never around the encoder
        seconds = time.perf_counter() - started
        self.metrics.lock_held.observe(held)
        self.progress.applied += len(batch)
        self.progress.batches += 1
        self._run_applied += len(batch)
        dead, late = self._source_deltas()
        lag = self.source.lag()  # KafkaSource: against the fetch high watermark, right on Tansu too
        users, items = len(self.store.users), len(self.store.items)
        self.metrics.observe_batch(len(batch), seconds, dead, late, self.progress.applied, users, items)
        self.metrics.set_resident(_resident(self.store.users), _resident(self.store.items))
        self.metrics.set_lag(lag)
        arrivals = self._arrival_times(batch)
        if arrivals is not None:
            self.metrics.event_to_update.observe(max(0.0, time.time() - float(arrivals.min())))
        for observer in self.observers:  # every batch: the query side also refreshes its popular items
            observer.note_batch_applied(arrivals if arrivals is not None else np.zeros(0))
        log.info("batch_applied", size=len(batch), latency_ms=round(seconds * 1000, 3), lag=sum(lag.values()),
                 lock_ms=round(held * 1000, 3), late_events=late, dlq_count=self.progress.dead_letters,
                 applied=self.progress.applied, users=users, items=items)

    @torch.no_grad()
    def _apply_batch(self, batch: EventBatch) -> float:
        """`engine.infer_batch` (its `infer_encodings`, then `commit_batch`: bit-identical results) with
        the query lock held only while the store changes; returns the seconds held.

        1. register the batch's new ids (lock): the only change before the commit. Readers then see
           ids without vectors: `committed_sizes` (read under the lock) keeps them unserved;
        2. gather the histories' cached vectors, run the encoder and stage the writes (no lock):
           reads only, and this thread is the store's only writer, so nothing changes under it.
           Staging computes the writes' costly read-only part: the IVF list of each new vector;
        3. write vectors, histories and popularity, and publish the new sizes (lock): readers see
           the whole batch or none of it.
        """
        store = self.store
        t0 = time.perf_counter()
        with self.lock:
            store.users.slots(batch.user, create=True)
            store.items.slots(batch.item, create=True)
        t1 = time.perf_counter()
        inputs, u, x, after = infer_encodings(self.bundle.model, store, batch, self.bundle.cache, self.ranks)
        staged = stage_commit(store, inputs, u, x, after)
        t2 = time.perf_counter()
        with self.lock:
            apply_commit(store, staged)
            self._publish_sizes()
        return (t1 - t0) + (time.perf_counter() - t2)

    def _publish_sizes(self) -> None:
        """Callers hold the lock: every user/item up to here has its vector written."""
        self._committed = {Kind.USER: len(self.store.users), Kind.ITEM: len(self.store.items)}

    def committed_sizes(self) -> dict[Kind, int]:
        """Users/items whose vectors are written (QueryEngine's `committed_sizes`; read under the lock)."""
        return self._committed

    def _dlq_restored(self) -> int:
        return 0 if self.state is None else self.state.dlq_restored

    def _poison_sent(self) -> int:
        return self.dead_letters.sent if self.dead_letters is not None else self.source.stats.poison

    def _source_deltas(self) -> tuple[int, int]:
        """New dead letters and late events since the previous batch (counters are per run)."""
        stats = self.source.stats
        late = stats.late
        poison = self._poison_sent()
        dead, new_late = poison - self._seen_poison, late - self._seen_late
        self._seen_poison, self._seen_late = poison, late
        self.progress.dead_letters = self._dlq_restored() + poison  # sent so far (each once per run)
        self.progress.late += new_late
        return dead, new_late

    def _arrival_times(self, batch: EventBatch) -> np.ndarray | None:
        """Wall-clock seconds at which the batch's events happened, for event-to-update latency.

        Event timestamps when they are wall-clock (the newest within a day of now); else the Kafka
        record timestamps when the source knows them (`last_batch_record_times_ms()`, one per
        event); else None (historical replays through a source without record timestamps).
        """
        if not len(batch):
            return None
        seconds = batch.timestamp.astype(np.float64) * self.ts_scale
        if abs(time.time() - float(seconds.max())) <= _WALL_CLOCK_WINDOW_S:
            return seconds
        record_ms = self.source.last_batch_record_times_ms()
        return None if record_ms is None else np.asarray(record_ms, dtype=np.float64) / 1000.0

    # -- snapshots --

    # -- model versions (online learning) --

    def adopt_due_version(self) -> None:
        """Between batches: switch to the version `VersionAdoption` says is due, if any."""
        if self.adoption is None:
            return
        due = self.adoption.due(dict(self.source.positions()), self.progress.applied,
                                lambda: self._stop_reason is not None)
        if due is not None:
            self._swap(due)
        self._backfill()
        self._observe_versions()

    def _swap(self, manifest: VersionManifest) -> None:
        assert self.versions is not None and self.adoption is not None
        started = time.perf_counter()
        bundle = bundle_from_version(self.versions, manifest.name, self.bundle)
        with self.lock:  # readers never see a half-swapped model (the cold-start encoder reads self.bundle)
            self.bundle = bundle
        if self.replicas is not None:  # every rank switches before the same batch
            self.replicas.send("model", {k: v.cpu() for k, v in bundle.model.state_dict().items()})
        self.adoption.current_seq = manifest.seq
        self._backfilled[:] = False
        swap = ModelSwap(manifest.name, bundle.version, self.progress.applied, int(self.store.users.history.events),
                         dict(self.source.positions()))
        self.model_history = (self.model_history + [swap])[-_HISTORY_KEPT:]
        self._swapped_at = time.time()
        if self.snapshots is not None:  # the versions its snapshots may name: never collected
            self.versions.pin(str(self.snapshots.root.resolve()), self._pinned_versions())
        fault_point("model_swapped")
        pause = time.perf_counter() - started
        self.metrics.swap_pause.observe(pause)
        log.info("model_swapped", version=manifest.name, model_version=bundle.version, applied=self.progress.applied,
                 trained_through=manifest.trained_through.events, pause_ms=round(pause * 1000, 3))

    @torch.no_grad()
    def _backfill(self) -> None:
        """`--backfill K`: re-encode the K most popular items last written by older weights (from
        their stored histories, what the next event would read) and write them; post_event caches."""
        if not self.config.backfill or not self.model_history:
            return
        items = self.store.items
        n = len(items)
        stale = (items.history.counts[:n] > 0) & (items.history.pop_at[:n] < self.model_history[-1].store_events)
        candidates = np.flatnonzero(stale & ~self._item_backfilled(n))
        if not len(candidates):
            return
        popularity = items.history.popularity(candidates)
        chosen = candidates[np.argsort(-popularity, kind="stable")[: self.config.backfill]]
        device = next(self.bundle.model.parameters()).device
        x = encode_sequences(self.bundle.model, stored_sequences(self.store, Kind.ITEM, chosen, device,
                                                                 self.bundle.cache))
        with self.lock:
            items.vectors.put(torch.from_numpy(chosen), x)
        self._backfilled[chosen] = True

    def _item_backfilled(self, n: int) -> np.ndarray:
        if len(self._backfilled) < n:
            self._backfilled = np.concatenate([self._backfilled, np.zeros(max(n, 2 * len(self._backfilled))
                                                                          - len(self._backfilled), dtype=bool)])
        return self._backfilled[:n]

    def _pinned_versions(self) -> list[str]:
        """The versions kept snapshots may name (their model history): `collect` keeps them."""
        return [swap.version for swap in self.model_history]

    def _observe_versions(self) -> None:
        """Gauges: the version in use, seconds since the last swap, share of vectors written by older weights."""
        since = self.model_history[-1].store_events if self.model_history else 0
        shares = {}
        for kind, table in (("user", self.store.users), ("item", self.store.items)):
            n = len(table)
            written = table.history.counts[:n] > 0
            stale = written & (table.history.pop_at[:n] < since)
            if kind == "item":
                stale &= ~self._item_backfilled(n)
            shares[kind] = float(stale.sum() / max(int(written.sum()), 1))
        seq = self.adoption.current_seq if self.adoption is not None else 0
        self.metrics.set_versions(seq, time.time() - self._swapped_at, shares)
        self.stale_share = shares

    def _snapshot_due(self) -> bool:
        if self.state is None:
            return False
        since = self.progress.applied - self._snapshot_applied
        return since >= self.config.snapshot_every_events or \
            (since > 0 and self.clock() - self._snapshot_time >= self.config.snapshot_every_seconds)

    def snapshot(self) -> Path | None:
        """Durably write store + offsets + counters (pipelines/worker_state.py), then commit offsets
        to the group (monitoring)."""
        if self.state is None:
            return None
        started = time.perf_counter()
        self.progress.offsets = dict(self.source.positions())  # flushes dead letters first
        log.info("snapshot_writing", applied=self.progress.applied, offsets=self.progress.offsets)
        meta = self.state.meta(self.progress, self.bundle, self._seen_poison, self.model_history)
        path = self.state.write(meta, None if self.replicas is None else self.replicas.check,
                                {"backfilled_items": self._backfilled[: len(self.store.items)].copy()}
                                if self.config.backfill else None)
        seconds = time.perf_counter() - started
        self.metrics.snapshot_duration.observe(seconds)
        self._snapshots_written += 1
        self._snapshot_applied, self._snapshot_time = self.progress.applied, self.clock()
        self._commit(self.progress.offsets)
        for observer in self.observers:
            observer.note_snapshot(int(path.name.rsplit("-", 1)[-1]), _utc_now())
        return path

    def _final_snapshot(self) -> None:
        """On every clean stop: snapshot when events were applied or positions moved (dead letters)."""
        if self.state is None:
            return
        if self.progress.applied > self._snapshot_applied or dict(self.source.positions()) != self.progress.offsets:
            self.snapshot()

    def _commit(self, offsets: dict[int, int]) -> None:
        """Group commit for lag monitoring only; a failure must not stop the worker."""
        if not self.config.group_id:
            return
        try:
            self.source.commit(offsets)
        except KafkaError as exc:
            log.warning("offset_commit_failed", error=str(exc))

    def restore(self) -> dict[int, int] | None:
        """Load the newest usable snapshot (pipelines/worker_state.py); its offsets, or None: from the beginning."""
        if self.state is None:
            return None
        restored = self.state.restore(self._accept_model)
        self.lineage = self.state.lineage
        with self.lock:
            self._publish_sizes()
        if restored is None:
            return None
        self.progress, self.restored_seq = restored.progress, restored.seq
        done = np.asarray(restored.extra.get("backfilled_items", np.zeros(0, dtype=bool)), dtype=bool)
        self._backfilled = np.zeros(max(len(done), 1024), dtype=bool)
        self._backfilled[: len(done)] = done
        self._snapshot_applied = self.progress.applied
        return dict(self.progress.offsets)

    def _accept_model(self, meta: SnapshotMeta, path: Path) -> None:
        """A snapshot's store was written by model `meta.model_version`: continue with that model.
        A snapshot made after a swap names its published version: it is loaded from --models-dir
        (never silently the --checkpoint); else the checkpoint must be the snapshot's, unless
        `allow_model_change`."""
        if meta.model_versions:
            self._restore_version(list(meta.model_versions), meta, path)
            return
        if meta.model_version == self.bundle.version:
            return
        if not self.config.allow_model_change:
            raise ModelError(
                f"snapshot {path} was made with model version {meta.model_version} "
                f"({meta.checkpoint}), this checkpoint is {self.bundle.version} ({self.bundle.path}); "
                "use the same checkpoint, another --snapshot-dir, or --allow-model-change to keep the "
                "old representations and continue with the new model")
        log.warning("snapshot_model_changed", old=meta.model_version, new=self.bundle.version)

    def _restore_version(self, history: list[ModelSwap], meta: SnapshotMeta, path: Path) -> None:
        name = history[-1].version
        if self.versions is None or self.adoption is None:
            raise ModelError(f"snapshot {path} was made with the published model version {name}: give the "
                             "--models-dir it came from (the worker never falls back to --checkpoint silently)")
        bundle = bundle_from_version(self.versions, name, self.bundle)
        if bundle.version != meta.model_version:
            raise ModelError(f"model version {name} in {self.versions.root} has weights {bundle.version}, but "
                             f"snapshot {path} was made with {meta.model_version}: another --models-dir?")
        self.bundle, self.model_history = bundle, history
        self.adoption.current_seq = self.versions.manifest(name).seq
        self._swapped_at = time.time()
        log.info("model_version_restored", version=name, model_version=bundle.version)

    def _result(self, seconds: float) -> WorkerResult:
        p = self.progress
        p.dead_letters = self._dlq_restored() + self._poison_sent()  # also those after the last batch, or without one
        return WorkerResult(self._run_applied, p.applied, p.batches, p.dead_letters, p.late, self._snapshots_written,
                            self.restored_seq, dict(p.offsets), round(seconds, 3),
                            round(self._run_applied / seconds, 1) if seconds > 0 else 0.0,
                            self._stop_reason or "unknown", len(self.store.users), len(self.store.items),
                            self.model_history[-1].version if self.model_history else "")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _resident(table: Any) -> int:
    return getattr(table, "resident", len(table))


def build_worker(checkpoint: str | Path, kafka_config: KafkaConfig, config: WorkerConfig, *,
                 shards: int | None = None, index_type: str | None = None, max_entities: int | None = None,
                 device: str = "auto", snapshot_dir: str | Path | None = None,
                 metrics: WorkerMetrics | None = None, lock: Any = None,
                 source_kwargs: Mapping[str, Any] | None = None, ranks: Ranks | None = None) -> StreamWorker:
    """Wire model, FAISS store, ordered source and snapshots (kafka_config needs bootstrap servers).
    With data-parallel `ranks` this is rank 0's worker (the others: `replicas.build_follower`)."""
    bundle, store = model_and_store(checkpoint, shards=shards, index_type=index_type, max_entities=max_entities,
                                    spill_dir=spill_dir_for(snapshot_dir), device=device, ranks=ranks)
    dead_letters = CountingDeadLetters(lambda: KafkaDeadLetters(kafka_config))
    source = make_source(kafka_config, config, dead_letters=dead_letters, **dict(source_kwargs or {}))
    snapshots = SnapshotManager(snapshot_dir, keep=config.keep_snapshots) if snapshot_dir is not None else None
    return StreamWorker(bundle, store, source, config, snapshots, metrics, lock, kafka_config.timestamp_unit,
                        dead_letters, ranks=ranks)


def store_fingerprint(store: RepresentationStore) -> dict[str, np.ndarray | list[str]]:
    """Flat view of a store for equality checks (tests, crash drills): ids, vectors, histories, counts,
    times and item/user popularity (with the event index it decays from).

    Spilled entities are read from their files (`EntityTable.read`), so a capped store and an
    uncapped one holding the same state give equal fingerprints.
    """
    out: dict[str, Any] = {}
    for name, table in (("user", store.users), ("item", store.items)):
        data = table.read(np.arange(len(table)))
        out[f"{name}_ids"] = table.ids.ids()
        out[f"{name}_vectors"] = data.raw()
        out.update({f"{name}_rows": data.rows, f"{name}_lengths": data.lengths, f"{name}_counts": data.counts,
                    f"{name}_last_time": data.last_time, f"{name}_pop": data.pop, f"{name}_pop_at": data.pop_at,
                    f"{name}_events": np.asarray([table.history.events])})
    return out
