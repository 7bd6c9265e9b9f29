"""The streaming worker with a cap (cache.max_entities) on an InMemorySource: the final state equals
the uncapped offline replay, snapshots refer to their spill files, a crash after spill writes and
before the next snapshot restarts to the same final state (popularity included), and only unreferenced
files are deleted."""

from __future__ import annotations

import json

import pytest

from felrec_stream.config import replace
from felrec_stream.errors import ConfigError, StoreError
from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.snapshot import MANIFEST, SnapshotManager
from felrec_stream.state.spill import SPILL_DIR
from felrec_stream.stream.source import InMemorySource
from felrec_stream.config import WorkerConfig
from pipelines.model import ModelBundle, load_model, spill_dir_for
from pipelines.worker import StreamWorker, store_fingerprint
from tests.pipelines import (assert_histories_match_table, assert_same_store, offline_replay, synthetic_events,
                             write_tiny_checkpoint)
from tests.pipelines.test_worker_in_memory import CrashingSource

N_EVENTS, BATCH, CAP = 1200, 32, 30
HALFLIFE = 50.0  # a decaying popularity prior: its state (pop, pop_at, events) must survive spill and snapshots
TOPIC = "in-memory-spill"


@pytest.fixture(scope="module")
def table():
    return synthetic_events(N_EVENTS, n_users=160, n_items=100, seed=11)


def _capped(plain: ModelBundle) -> ModelBundle:
    cache = replace(plain.cache, max_entities=CAP, shards=2, popularity_halflife=HALFLIFE)
    return ModelBundle(plain.model, cache, plain.configs, plain.version, plain.path)


def _uninterrupted(bundle, table):
    """Reference: the same batches applied offline on an uncapped store."""
    return store_fingerprint(offline_replay(bundle.model, table, BATCH, replace(bundle.cache, max_entities=0)))


@pytest.fixture(scope="module")
def bundle(checkpoint):
    return _capped(load_model(checkpoint))


@pytest.fixture(scope="module")
def uninterrupted(bundle, table):
    return _uninterrupted(bundle, table)


@pytest.fixture(scope="module")
def post_event(tmp_path_factory, table):
    """(bundle, reference) of a model whose cache holds post-event encodings."""
    plain = load_model(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "post.pt", cache_update="post_event"))
    return _capped(plain), _uninterrupted(_capped(plain), table)


def _worker(bundle, source, snapshot_dir, **options) -> StreamWorker:
    options = WorkerConfig(TOPIC, batch_size=BATCH, until_end=True, **options)
    store = make_store(bundle.dim, bundle.cache, spill_dir=spill_dir_for(snapshot_dir))
    return StreamWorker(bundle, store, source, options, SnapshotManager(snapshot_dir))


def _spill_files(snapshot_dir) -> set[str]:
    return {p.name for p in (snapshot_dir / SPILL_DIR).iterdir()}


def _referenced(snapshot_dir) -> set[str]:
    return {ref.split("/", 1)[1] for ref in SnapshotManager(snapshot_dir).referenced()}


def test_capped_worker_ends_like_the_uncapped_replay(bundle, table, uninterrupted, tmp_path):
    worker = _worker(bundle, InMemorySource(table, BATCH), tmp_path / "snap", snapshot_every_events=256)
    result = worker.run()
    assert result.applied_total == N_EVENTS and min(result.users, result.items) > 3 * CAP
    fingerprint = store_fingerprint(worker.store)
    assert_same_store(fingerprint, uninterrupted)
    assert_histories_match_table(fingerprint, table, bundle.cache.history_len)
    assert worker.store.users.evicted > 160 and worker.store.users.resident <= BATCH
    # every kept snapshot lists its spill files; nothing else is left on disk
    manager = SnapshotManager(tmp_path / "snap")
    newest = manager.latest_valid()
    assert newest.refs and all(ref.startswith(f"{SPILL_DIR}/") for ref in newest.refs)
    assert _spill_files(tmp_path / "snap") == _referenced(tmp_path / "snap")
    assert len(manager.snapshots()) == 3  # pruned to `keep`; files of pruned snapshots were collected


@pytest.mark.parametrize("update", ["pre_event", "post_event"])
def test_crash_after_spill_writes_restarts_to_the_same_state(bundle, table, uninterrupted, post_event, update,
                                                             tmp_path):
    if update == "post_event":
        bundle, uninterrupted = post_event
    snap = tmp_path / "snap"
    crashing = _worker(bundle, CrashingSource(table, BATCH, crash_at_batch=29), snap, snapshot_every_events=256)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    assert SnapshotManager(snap).latest_valid().meta["offsets"] == {"0": 768}  # batches 24-28 never snapshotted
    orphans = _spill_files(snap) - _referenced(snap)
    assert orphans, "the crashed run wrote spill files after its last snapshot"

    second = _worker(bundle, InMemorySource(table, BATCH), snap, snapshot_every_events=10**6)
    result = second.run()
    assert (result.restored_seq, result.applied_this_run, result.applied_total) == (3, N_EVENTS - 768, N_EVENTS)
    fingerprint = store_fingerprint(second.store)
    assert_same_store(fingerprint, uninterrupted)
    assert_histories_match_table(fingerprint, table, bundle.cache.history_len)  # nothing lost or applied twice
    assert _spill_files(snap) == _referenced(snap)  # the orphans were collected (or written again and referenced)


def test_a_snapshot_whose_spill_file_is_gone_is_skipped(bundle, table, uninterrupted, tmp_path):
    snap = tmp_path / "snap"
    first = _worker(bundle, InMemorySource(table, BATCH), snap, max_events=640, snapshot_every_events=256)
    first.run()
    manager = SnapshotManager(snap)
    newest = manager.current_seq()
    refs = json.loads((snap / f"snap-{newest:012d}" / MANIFEST).read_text())["refs"]
    older = set().union(*(json.loads((snap / f"snap-{s:012d}" / MANIFEST).read_text())["refs"]
                          for s in manager.snapshots() if s < newest))
    (snap / sorted(set(refs) - older)[0]).unlink()  # a file only the newest snapshot needs
    second = _worker(bundle, InMemorySource(table, BATCH), snap)
    result = second.run()
    assert second.restored_seq is not None and second.restored_seq < newest
    assert result.applied_total == N_EVENTS
    assert_same_store(store_fingerprint(second.store), uninterrupted)


def test_a_capped_store_must_spill_next_to_its_snapshots(bundle, table, tmp_path):
    store = make_store(bundle.dim, bundle.cache)  # private temporary spill directory
    with pytest.raises(ConfigError, match="must spill into"):
        StreamWorker(bundle, store, InMemorySource(table, BATCH), WorkerConfig(TOPIC), SnapshotManager(tmp_path))


def test_a_spill_path_that_is_a_file_is_a_one_line_error(bundle, tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / SPILL_DIR).write_text("not a folder")
    with pytest.raises(StoreError, match=f"spill directory {snap / SPILL_DIR} .*not a directory"):
        make_store(bundle.dim, bundle.cache, spill_dir=spill_dir_for(snap))


class _SpillDeletingSource(InMemorySource):
    """Deletes every spill file at one batch, as an operator's `rm` while the worker runs would."""

    def __init__(self, table, batch_size: int, spill_dir, at_batch: int) -> None:
        super().__init__(table, batch_size)
        self.spill_dir, self.at_batch = spill_dir, at_batch

    def poll_batch(self, timeout_s: float = 0.1):
        if self.stats.batches == self.at_batch:
            for path in self.spill_dir.iterdir():
                path.unlink()
        return super().poll_batch(timeout_s)


def test_spill_files_deleted_under_a_running_worker_stop_it_with_a_one_line_error(bundle, table, uninterrupted,
                                                                                   tmp_path):
    snap = tmp_path / "snap"
    source = _SpillDeletingSource(table, BATCH, snap / SPILL_DIR, at_batch=12)
    with pytest.raises(StoreError, match="spill file .* is missing"):
        _worker(bundle, source, snap, snapshot_every_events=96).run()
    second = _worker(bundle, InMemorySource(table, BATCH), snap)  # the restart recovers exactly once
    assert second.run().applied_total == N_EVENTS
    assert_same_store(store_fingerprint(second.store), uninterrupted)


def _flip_bytes(path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_spill_file_makes_its_snapshot_unusable_and_an_older_one_is_restored(bundle, table, uninterrupted,
                                                                                        tmp_path):
    """4 flipped bytes in a spill file only the newest snapshot needs (same size): the content is
    verified, that snapshot skipped, the previous one restored, and the run ends like the uninterrupted one."""
    snap = tmp_path / "snap"
    _worker(bundle, InMemorySource(table, BATCH), snap, max_events=640, snapshot_every_events=256).run()
    manager = SnapshotManager(snap)
    newest = manager.current_seq()
    refs = json.loads((snap / f"snap-{newest:012d}" / MANIFEST).read_text())["refs"]
    older = set().union(*(json.loads((snap / f"snap-{s:012d}" / MANIFEST).read_text())["refs"]
                          for s in manager.snapshots() if s < newest))
    _flip_bytes(snap / sorted(set(refs) - older)[0])
    second = _worker(bundle, InMemorySource(table, BATCH), snap)
    result = second.run()
    assert second.restored_seq is not None and second.restored_seq < newest
    assert result.applied_total == N_EVENTS
    assert_same_store(store_fingerprint(second.store), uninterrupted)


def test_a_capped_snapshot_dir_restarted_without_the_cap_is_refused_and_kept(bundle, table, tmp_path):
    """Not "every snapshot corrupt, start from 0, prune them": a one-line error, and nothing deleted."""
    snap = tmp_path / "snap"
    _worker(bundle, InMemorySource(table, BATCH), snap, max_events=640, snapshot_every_events=256).run()
    before = (SnapshotManager(snap).snapshots(), _spill_files(snap))
    plain = ModelBundle(bundle.model, replace(bundle.cache, max_entities=0), bundle.configs, bundle.version,
                        bundle.path)
    with pytest.raises(ConfigError, match=f"cache.max_entities={CAP}.*--max-entities {CAP}"):
        _worker(plain, InMemorySource(table, BATCH), snap).run()
    assert (SnapshotManager(snap).snapshots(), _spill_files(snap)) == before
