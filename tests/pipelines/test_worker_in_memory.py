"""The streaming worker on an InMemorySource (no broker): every event applied, snapshots and
restores that continue exactly, graceful stop requests."""

from __future__ import annotations

import pytest

from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.snapshot import SnapshotManager
from felrec_stream.stream.source import InMemorySource
from pipelines.worker import StreamWorker, WorkerOptions, load_model, store_fingerprint
from tests.pipelines import assert_histories_match_table, assert_same_store, offline_replay, synthetic_events

N_EVENTS, BATCH = 600, 32
TOPIC = "in-memory"


@pytest.fixture(scope="module")
def table():
    return synthetic_events(N_EVENTS)


@pytest.fixture(scope="module")
def bundle(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def uninterrupted(bundle, table):
    """The reference: the same batches applied offline by engine.infer_batch."""
    return store_fingerprint(offline_replay(bundle.model, table, BATCH, bundle.cache))


def _worker(bundle, source, snapshot_dir, **options) -> StreamWorker:
    options = WorkerOptions(TOPIC, batch_size=BATCH, until_end=True, **options)
    snapshots = SnapshotManager(snapshot_dir) if snapshot_dir is not None else None
    return StreamWorker(bundle, make_store(bundle.dim, bundle.cache), source, options, snapshots)


class CrashingSource(InMemorySource):
    """Raises in the middle of a run, as a killed process would stop: no final snapshot."""

    def __init__(self, table, batch_size: int, crash_at_batch: int) -> None:
        super().__init__(table, batch_size)
        self.crash_at_batch = crash_at_batch

    def poll_batch(self, timeout_s: float = 0.1):
        if self.stats.batches == self.crash_at_batch:
            raise RuntimeError("simulated crash")
        return super().poll_batch(timeout_s)


def test_worker_applies_every_event_like_the_offline_replay(bundle, table, uninterrupted, tmp_path):
    source = InMemorySource(table, BATCH)
    worker = _worker(bundle, source, tmp_path / "snap", snapshot_every_events=200)
    result = worker.run()
    assert (result.applied_total, result.batches, result.stopped_by) == (N_EVENTS, 19, "end_of_topic")
    fingerprint = store_fingerprint(worker.store)
    assert_same_store(fingerprint, uninterrupted)
    assert_histories_match_table(fingerprint, table, bundle.cache.history_len)
    snapshot = SnapshotManager(tmp_path / "snap").latest_valid()
    assert snapshot.meta["offsets"] == {"0": N_EVENTS} and snapshot.meta["applied_events"] == N_EVENTS
    assert result.snapshots >= 3 and source.lag() == {0: 0}


def test_restart_after_a_clean_stop_continues_exactly(bundle, table, uninterrupted, tmp_path):
    first = _worker(bundle, InMemorySource(table, BATCH), tmp_path / "snap", max_events=250)
    assert first.run().stopped_by == "max_events"  # at the batch boundary 256, then a final snapshot
    second = _worker(bundle, InMemorySource(table, BATCH), tmp_path / "snap")
    result = second.run()
    assert (result.restored_seq, result.applied_this_run, result.applied_total) == (1, N_EVENTS - 256, N_EVENTS)
    assert_same_store(store_fingerprint(second.store), uninterrupted)


def test_restart_after_a_crash_continues_from_the_last_snapshot(bundle, table, uninterrupted, tmp_path):
    crashing = _worker(bundle, CrashingSource(table, BATCH, crash_at_batch=11), tmp_path / "snap",
                       snapshot_every_events=96)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    restored = SnapshotManager(tmp_path / "snap").latest_valid()
    assert restored.meta["offsets"] == {"0": 288}  # batches 10 and 11 were applied but never snapshotted
    second = _worker(bundle, InMemorySource(table, BATCH), tmp_path / "snap")
    result = second.run()
    assert (result.applied_this_run, result.applied_total) == (N_EVENTS - 288, N_EVENTS)
    assert_same_store(store_fingerprint(second.store), uninterrupted)


def test_stop_request_finishes_the_batch_snapshots_and_returns(bundle, table, tmp_path):
    class StopAfterThree(InMemorySource):
        def poll_batch(self, timeout_s: float = 0.1):
            batch = super().poll_batch(timeout_s)
            if self.stats.batches == 3:
                worker.request_stop("test")  # e.g. SIGTERM arriving while a batch is in flight
            return batch

    source = StopAfterThree(table, BATCH)
    worker = _worker(bundle, source, tmp_path / "snap")
    result = worker.run()
    assert (result.stopped_by, result.applied_total, result.snapshots) == ("test", 3 * BATCH, 1)
    assert source.stopped and source.committed == {}  # no group_id: nothing committed
    assert SnapshotManager(tmp_path / "snap").latest_valid().meta["offsets"] == {"0": 3 * BATCH}
