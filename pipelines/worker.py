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

Restore rules (`restore`)
-------------------------
- One writer per snapshot directory, for the worker's whole life (`SnapshotManager.acquire` in
  `run`, which first checks that the directory is writable: a bad one fails before any event).
- The newest snapshot that verifies (checksummed files *and* manifest) and whose state loads is
  used; a damaged one is skipped for the previous one.
- A snapshot holds the topic's identity (`Source.identity()`): restoring it on a topic that was
  deleted and refilled under the same name is refused, since its offsets point into other data.
- Snapshots were committed but none is usable: the worker starts from the beginning with an
  error-level log line, and refuses when the topic no longer starts at offset 0 (retention deleted
  events the lost state held).
- `reset_state` (`--reset-state`): in the two refusals above, discard the snapshots and start from
  the beginning (earliest available offsets) instead. A usable snapshot is always restored.
- Every snapshot carries a `lineage` id, new whenever the worker starts without restoring one, so
  read replicas (`serve`) notice a directory that was reset even when its seq numbers went down.

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

import hashlib
import json
import threading
import time
import uuid
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch

from connectors.kafka.dlq import KafkaDeadLetters
from connectors.kafka.source import KafkaSource
from felrec_stream.config import CacheConfig, Configs, KafkaConfig, replace, to_dict
from felrec_stream.device import resolve_device
from felrec_stream.errors import ConfigError, KafkaError, ModelError, StoreError
from felrec_stream.faults import fault_point
from felrec_stream.log import get_logger
from felrec_stream.model.felrec import FELRec
from felrec_stream.parallel import Ranks
from felrec_stream.state.checkpoint import load_checkpoint
from felrec_stream.state.engine import commit_batch, infer_encodings
from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.snapshot import Snapshot, SnapshotCorrupt, SnapshotManager
from felrec_stream.state.spill import SPILL_DIR
from felrec_stream.state.store import Kind, RepresentationStore
from felrec_stream.stream.events import EventBatch
from felrec_stream.stream.messages import TS_UNITS, PoisonMessage
from felrec_stream.stream.source import DeadLetterSink, Source
from pipelines.prometheus import WorkerMetrics

log = get_logger(__name__)

SNAPSHOT_KIND = "felrec-worker"
SNAPSHOT_FORMAT = 1
_NO_TIME_LIMIT_S = 1e9  # until_end: batches are cut by count only
_WALL_CLOCK_WINDOW_S = 86_400.0


# ---- model ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelBundle:
    """The trained encoder (eval mode) plus the configs and version the worker records in snapshots."""

    model: FELRec
    cache: CacheConfig  # as run: the checkpoint's, with the worker's shards/index_type overrides
    configs: Configs  # as saved in the checkpoint
    version: str
    path: str

    @property
    def dim(self) -> int:
        return self.model.encoder_config.d_model


def model_version(model_state: Mapping[str, torch.Tensor], configs: Configs) -> str:
    """sha256 over the weights and the configs that change what the encoder writes.

    Why not the file hash: re-saving the same weights (another epoch counter, optimizer state)
    must not invalidate a worker's snapshots; a changed weight or history length must.
    """
    sha = hashlib.sha256()
    for name in sorted(model_state):
        tensor = model_state[name].detach().cpu().contiguous()
        sha.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    shaping = {"encoder": to_dict(configs.encoder), "model": to_dict(configs.model),
               "history_len": configs.cache.history_len, "cold_start_input": configs.cache.cold_start_input}
    if configs.cache.popularity_halflife:  # only when set: versions of checkpoints without it stay the same
        shaping["popularity_halflife"] = configs.cache.popularity_halflife
    sha.update(json.dumps(shaping, sort_keys=True).encode())
    return sha.hexdigest()[:16]


def load_model(path: str | Path, device: torch.device | str = "cpu") -> ModelBundle:
    """Load a trained FELRec checkpoint for inference (eval mode: no dropout, BatchNorm frozen)."""
    checkpoint = load_checkpoint(path, map_location="cpu")
    configs = checkpoint.configs
    model = FELRec(configs.encoder, configs.model)
    try:
        model.load_state_dict(checkpoint.model_state)
    except RuntimeError as exc:
        raise ModelError(f"checkpoint {path} does not match its own configs: {exc}") from exc
    model.eval().requires_grad_(False).to(device)
    return ModelBundle(model, configs.cache, configs, model_version(checkpoint.model_state, configs), str(path))


# ---- options and progress ---------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerOptions:
    """How the worker cuts batches, when it snapshots and when it stops (see the module docstring)."""

    topic: str
    batch_size: int = 256
    max_wait_ms: int = 50  # follow mode only
    until_end: bool = False
    max_events: int | None = None  # stop at the first batch boundary at or after this many (this run)
    snapshot_every_events: int = 50_000
    snapshot_every_seconds: float = 60.0
    allow_model_change: bool = False
    group_id: str | None = None  # consumer group for monitoring commits (None: no commits)
    reset_state: bool = False  # discard unusable snapshots instead of refusing (see "Restore rules")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_wait_ms < 0:
            raise ConfigError("batch_size must be >= 1 and max_wait_ms >= 0")
        if self.snapshot_every_events < 1 or self.snapshot_every_seconds <= 0:
            raise ConfigError("snapshot_every_events must be >= 1 and snapshot_every_seconds > 0")
        if self.max_events is not None and self.max_events < 1:
            raise ConfigError("max_events must be >= 1")


@dataclass
class Progress:
    """Counters that travel inside every snapshot (absolute since the topic start)."""

    applied: int = 0
    batches: int = 0
    dead_letters: int = 0
    late: int = 0
    offsets: dict[int, int] = field(default_factory=dict)


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


def make_source(kafka_config: KafkaConfig, options: WorkerOptions, **kwargs: Any) -> KafkaSource:
    """The ordered source with the batch rules guarantee 2 needs (count-only cuts in until_end)."""
    max_wait_s = _NO_TIME_LIMIT_S if options.until_end else options.max_wait_ms / 1000
    return KafkaSource(kafka_config, options.topic, until_end=options.until_end, batch_size=options.batch_size,
                       max_wait_s=max_wait_s, group_id=options.group_id, **kwargs)


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

    def __init__(self, bundle: ModelBundle, store: RepresentationStore, source: Source, options: WorkerOptions,
                 snapshots: SnapshotManager | None = None, metrics: WorkerMetrics | None = None,
                 lock: Any = None, timestamp_unit: str = "s", dead_letters: CountingDeadLetters | None = None,
                 clock: Callable[[], float] = time.monotonic, ranks: Ranks | None = None) -> None:
        self.bundle, self.store, self.source, self.options = bundle, store, source, options
        self.ranks = ranks  # data-parallel: this is rank 0, the followers apply what it sends (pipelines/replicas.py)
        self.replicas = None
        if ranks is not None:
            from pipelines.replicas import Leader  # the followers' protocol imports this module

            self.replicas = Leader(ranks, self.request_stop)
        _check_spill_dir(store, snapshots)
        self.dead_letters = dead_letters  # the sink the source sends to, for exact counts
        self.snapshots = snapshots
        self.metrics = metrics or WorkerMetrics()
        self.lock = lock if lock is not None else threading.RLock()
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
        self._dlq_restored = 0
        self._seen_poison = 0
        self._seen_late = 0
        self.observers: list[WorkerObserver] = []  # read side, e.g. serving.app.QueryEngine
        self._committed = {Kind.USER: len(store.users), Kind.ITEM: len(store.items)}

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
                log.info("worker_started", topic=self.options.topic, applied=self.progress.applied,
                         batch_size=self.options.batch_size, until_end=self.options.until_end,
                         model_version=self.bundle.version, restored_seq=self.restored_seq, lineage=self.lineage)
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
                if self.options.max_events is not None and self._run_applied >= self.options.max_events:
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
        2. gather the histories' cached vectors and run the encoder (no lock): reads only, and this
           thread is the store's only writer, so nothing changes under it;
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
        t2 = time.perf_counter()
        with self.lock:
            commit_batch(store, inputs, u, x, after)
            self._publish_sizes()
        return (t1 - t0) + (time.perf_counter() - t2)

    def _publish_sizes(self) -> None:
        """Callers hold the lock: every user/item up to here has its vector written."""
        self._committed = {Kind.USER: len(self.store.users), Kind.ITEM: len(self.store.items)}

    def committed_sizes(self) -> dict[Kind, int]:
        """Users/items whose vectors are written (QueryEngine's `committed_sizes`; read under the lock)."""
        return self._committed

    def _source_deltas(self) -> tuple[int, int]:
        """New dead letters and late events since the previous batch (counters are per run)."""
        stats = self.source.stats
        late = stats.late
        poison = self.dead_letters.sent if self.dead_letters is not None else stats.poison
        dead, new_late = poison - self._seen_poison, late - self._seen_late
        self._seen_poison, self._seen_late = poison, late
        self.progress.dead_letters = self._dlq_restored + poison  # sent so far (each once per run)
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

    def _snapshot_due(self) -> bool:
        if self.snapshots is None:
            return False
        since = self.progress.applied - self._snapshot_applied
        return since >= self.options.snapshot_every_events or \
            (since > 0 and self.clock() - self._snapshot_time >= self.options.snapshot_every_seconds)

    def snapshot(self) -> Path | None:
        """Durably write store + offsets + counters, then commit offsets to the group (monitoring)."""
        if self.snapshots is None:
            return None
        started = time.perf_counter()
        offsets = dict(self.source.positions())  # flushes dead letters first
        log.info("snapshot_writing", applied=self.progress.applied, offsets=offsets)
        # No query lock: this thread is the store's only writer and runs between batches, so the
        # copy cannot be torn; holding the lock would stall queries for the whole copy (~1 s at 1M).
        state = {"store": self.store.state_dict()}
        refs = {f"{SPILL_DIR}/{name}": info for name, info in self.store.spill_refs().items()}
        if self.replicas is not None:
            self.replicas.check(state["store"])  # what is written is every rank's state
        self.progress.offsets = offsets
        path = self.snapshots.write_state(state, self._meta(), refs=refs)
        self._collect_spill()
        seconds = time.perf_counter() - started
        self.metrics.snapshot_duration.observe(seconds)
        self._snapshots_written += 1
        self._snapshot_applied, self._snapshot_time = self.progress.applied, self.clock()
        self._commit(offsets)
        for observer in self.observers:
            observer.note_snapshot(int(path.name.rsplit("-", 1)[-1]), _utc_now())
        return path

    def _final_snapshot(self) -> None:
        """On every clean stop: snapshot when events were applied or positions moved (dead letters)."""
        if self.snapshots is None:
            return
        if self.progress.applied > self._snapshot_applied or dict(self.source.positions()) != self.progress.offsets:
            self.snapshot()

    def _collect_spill(self) -> None:
        """Delete spill files that neither the live store nor a kept snapshot refers to."""
        if self.snapshots is None or self.store.spill is None:
            return
        prefix = f"{SPILL_DIR}/"
        protected = {ref[len(prefix):] for ref in self.snapshots.referenced() if ref.startswith(prefix)}
        with self.lock:
            self.store.collect_spill(protected)

    def _commit(self, offsets: dict[int, int]) -> None:
        """Group commit for lag monitoring only; a failure must not stop the worker."""
        if self.options.group_id is None:
            return
        try:
            self.source.commit(offsets)
        except KafkaError as exc:
            log.warning("offset_commit_failed", error=str(exc))

    def _meta(self) -> dict[str, Any]:
        p = self.progress
        dead = self._dlq_restored + (self.dead_letters.settle(p.offsets) if self.dead_letters is not None
                                     else self._seen_poison)
        return {"kind": SNAPSHOT_KIND, "format": SNAPSHOT_FORMAT, "topic": self.options.topic,
                "lineage": self.lineage, "topic_identity": self.source.identity(),
                "offsets": {str(k): int(v) for k, v in sorted(p.offsets.items())},
                "applied_events": p.applied, "batches": p.batches, "dead_letters": dead,
                "late_events": p.late, "batch_size": self.options.batch_size,
                "model_version": self.bundle.version, "checkpoint": self.bundle.path,
                "cache": to_dict(self.bundle.cache),  # as run (shards, index); serving reads it
                "configs": {k: to_dict(getattr(self.bundle.configs, k))
                            for k in ("encoder", "model", "cache", "scoring")}}

    def restore(self) -> dict[int, int] | None:
        """Load the newest usable snapshot into the (empty) store; returns its offsets (None: from
        the beginning). The rules are in the module docstring ("Restore rules")."""
        self.lineage = uuid.uuid4().hex[:16]  # a new history unless a snapshot is restored
        if self.snapshots is None:
            return None
        found = self.snapshots.load_newest(self._load_snapshot)
        if found is not None and found[1] is not None:
            snapshot, why = found
            self._refuse_or_reset(f"topic {self.options.topic!r} is not the topic snapshot {snapshot.path} was "
                                  f"made from: {why}")
            found = None
        if found is None:
            self._check_fresh_start()
            return None
        snapshot, meta = found[0], found[0].meta
        self.progress = Progress(int(meta["applied_events"]), int(meta["batches"]), int(meta["dead_letters"]),
                                 int(meta["late_events"]), {int(k): int(v) for k, v in meta["offsets"].items()})
        self.restored_seq = snapshot.seq
        self.lineage = snapshot.lineage or self.lineage
        self._collect_spill()  # files a crashed run wrote after this snapshot
        self._snapshot_applied = self.progress.applied
        self._dlq_restored = self.progress.dead_letters
        log.info("worker_restored", seq=snapshot.seq, applied=self.progress.applied, offsets=self.progress.offsets,
                 users=len(self.store.users), items=len(self.store.items), lineage=self.lineage)
        return dict(self.progress.offsets)

    def _load_snapshot(self, snapshot: Snapshot) -> str | None:
        """Check a snapshot, then load its store; returns why the topic differs (nothing loaded then).

        Wrong kind/topic name/model raise (the operator must decide); a state that does not load
        raises SnapshotCorrupt, so the previous snapshot is tried.
        """
        self._check_snapshot(snapshot)
        why = self.source.verify_identity(snapshot.meta.get("topic_identity") or {})
        if why is not None:
            return why
        try:
            with self.lock:
                self.store.load_state_dict(snapshot.state()["store"])
                self._publish_sizes()
        except StoreError as exc:
            raise SnapshotCorrupt(f"its store state does not load: {exc}") from None
        return None

    def _check_fresh_start(self) -> None:
        """No snapshot to restore. Committed ones that are all unusable mean the state is lost:
        loud, and refused when the topic no longer starts at offset 0 (unless reset_state)."""
        assert self.snapshots is not None
        if not self.snapshots.has_committed():
            return
        lost = {p: o for p, o in self.source.earliest_positions().items() if o > 0}
        log.error("snapshots_unusable", root=str(self.snapshots.root), earliest_offsets=lost or None,
                  action="discarding them" if lost and self.options.reset_state else
                  "applying the topic again from its beginning")
        if lost:
            self._refuse_or_reset(f"no snapshot under {self.snapshots.root} is usable and topic "
                                  f"{self.options.topic!r} no longer starts at offset 0 (earliest offsets {lost}): "
                                  "the events before them are gone")

    def _refuse_or_reset(self, problem: str) -> None:
        assert self.snapshots is not None
        if not self.options.reset_state:
            raise StoreError(f"{problem}; to discard the snapshots and start from the earliest available offsets, "
                             "run once with --reset-state (or use another --snapshot-dir)")
        log.warning("worker_state_reset", problem=problem)
        self.snapshots.discard_all()

    def _check_snapshot(self, snapshot: Snapshot) -> None:
        meta = snapshot.meta
        if meta.get("kind") != SNAPSHOT_KIND or meta.get("format") != SNAPSHOT_FORMAT:
            raise StoreError(f"{snapshot.path} is not a worker snapshot (kind={meta.get('kind')!r}, "
                             f"format={meta.get('format')!r})")
        if meta["topic"] != self.options.topic:
            raise StoreError(f"snapshot {snapshot.path} was made from topic {meta['topic']!r}, not "
                             f"{self.options.topic!r}: use another --snapshot-dir per topic")
        if meta["model_version"] != self.bundle.version:
            if not self.options.allow_model_change:
                raise ModelError(
                    f"snapshot {snapshot.path} was made with model version {meta['model_version']} "
                    f"({meta.get('checkpoint')}), this checkpoint is {self.bundle.version} ({self.bundle.path}); "
                    "use the same checkpoint, another --snapshot-dir, or --allow-model-change to keep the "
                    "old representations and continue with the new model")
            log.warning("snapshot_model_changed", old=meta["model_version"], new=self.bundle.version)
        if meta["batch_size"] != self.options.batch_size:
            log.warning("snapshot_batch_size_changed", old=meta["batch_size"], new=self.options.batch_size,
                        hint="batch boundaries differ from the run that wrote the snapshot")

    def _result(self, seconds: float) -> WorkerResult:
        p = self.progress
        return WorkerResult(self._run_applied, p.applied, p.batches, p.dead_letters, p.late, self._snapshots_written,
                            self.restored_seq, dict(p.offsets), round(seconds, 3),
                            round(self._run_applied / seconds, 1) if seconds > 0 else 0.0,
                            self._stop_reason or "unknown", len(self.store.users), len(self.store.items))


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _resident(table: Any) -> int:
    return getattr(table, "resident", len(table))


def _check_spill_dir(store: RepresentationStore, snapshots: SnapshotManager | None) -> None:
    """A capped store that is snapshotted must spill into <snapshot root>/spill (manifest refs)."""
    if store.spill is None or snapshots is None:
        return
    expected = (snapshots.root / SPILL_DIR).resolve()
    if store.spill.directory.resolve() != expected:
        raise ConfigError(f"a store with cache.max_entities must spill into {expected} to be snapshotted "
                          f"(make_store(..., spill_dir=...)), not {store.spill.directory}")


def model_and_store(checkpoint: str | Path, *, shards: int | None = None, index_type: str | None = None,
                    max_entities: int | None = None, spill_dir: Path | None = None,
                    device: str = "auto", ranks: Ranks | None = None) -> tuple[ModelBundle, RepresentationStore]:
    """The trained encoder (with the worker's shards/index_type/max_entities overrides) and an empty
    FAISS store (a capped one spills into `spill_dir`; None: a temporary folder)."""
    torch_device = resolve_device(device)
    if ranks is not None:
        torch_device = ranks.place(torch_device)
    bundle = load_model(checkpoint, torch_device)
    overrides = {k: v for k, v in (("shards", shards), ("index_type", index_type), ("max_entities", max_entities))
                 if v is not None}
    cache = replace(bundle.cache, **overrides)
    if ranks is not None and cache.max_entities:
        # Followers restore rank 0's state and apply its batches; a spill would have to be shared too.
        raise ConfigError("cache.max_entities (a spilling store) is not supported with data-parallel ranks yet")
    bundle = ModelBundle(bundle.model, cache, bundle.configs, bundle.version, bundle.path)
    return bundle, make_store(bundle.dim, cache, torch_device, spill_dir=spill_dir)


def build_worker(checkpoint: str | Path, kafka_config: KafkaConfig, options: WorkerOptions, *,
                 shards: int | None = None, index_type: str | None = None, max_entities: int | None = None,
                 device: str = "auto", snapshot_dir: str | Path | None = None, keep_snapshots: int = 3,
                 metrics: WorkerMetrics | None = None, lock: Any = None,
                 source_kwargs: Mapping[str, Any] | None = None, ranks: Ranks | None = None) -> StreamWorker:
    """Wire model, FAISS store, ordered source and snapshots (kafka_config needs bootstrap servers).
    With data-parallel `ranks` this is rank 0's worker (the others: `replicas.build_follower`)."""
    bundle, store = model_and_store(checkpoint, shards=shards, index_type=index_type, max_entities=max_entities,
                                    spill_dir=spill_dir_for(snapshot_dir), device=device, ranks=ranks)
    dead_letters = CountingDeadLetters(lambda: KafkaDeadLetters(kafka_config))
    source = make_source(kafka_config, options, dead_letters=dead_letters, **dict(source_kwargs or {}))
    snapshots = SnapshotManager(snapshot_dir, keep=keep_snapshots) if snapshot_dir is not None else None
    return StreamWorker(bundle, store, source, options, snapshots, metrics, lock, kafka_config.timestamp_unit,
                        dead_letters, ranks=ranks)


def spill_dir_for(snapshot_dir: str | Path | None) -> Path | None:
    """Where a capped store spills: next to the snapshots that refer to its files (None: a temp dir)."""
    return None if snapshot_dir is None else Path(snapshot_dir) / SPILL_DIR


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
