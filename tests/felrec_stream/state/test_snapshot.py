"""SnapshotManager: exact state round trips, corruption fallback (files and the manifest itself),
retention, crash before commit, readers racing the writer's pruning, the writer's lock, bad directories."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from felrec_stream.config import CacheConfig
from felrec_stream.errors import StoreError
from felrec_stream.state import durable as durable_module
from felrec_stream.state import snapshot as snapshot_module
from felrec_stream.state.codec import flatten_state, unflatten_state
from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.snapshot import SnapshotManager
from felrec_stream.state.store import RepresentationStore
from tests.waiting import wait_for

D = 8


def _filled(store: RepresentationStore, seed: int = 0) -> RepresentationStore:
    rng = np.random.default_rng(seed)
    for _ in range(4):
        users = np.asarray([f"u{i}" for i in rng.integers(0, 20, 12)] + ["ü-ß-用户"], dtype=object)
        items = np.asarray([f"i{i}" for i in rng.integers(0, 30, 13)], dtype=object)
        u, i = store.users.slots(users), store.items.slots(items)
        plan = store.users.history.plan(u, i)
        store.users.history.apply(plan, last_time=np.arange(len(plan.unique_slots)))
        store.items.history.apply(store.items.history.plan(i, u))
        store.users.vectors.put(torch.from_numpy(plan.unique_slots),
                                torch.from_numpy(rng.normal(size=(len(plan.unique_slots), D)).astype(np.float32)))
    return store


def _assert_same_state(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("backend", ["tensor", "faiss"])
def test_store_state_round_trips_exactly(tmp_path, backend):
    make = (lambda: RepresentationStore(D, history_len=3)) if backend == "tensor" else \
        (lambda: make_store(D, CacheConfig(history_len=3, shards=3)))
    store = _filled(make())
    manager = SnapshotManager(tmp_path)
    extra = ((lambda d: store.items.vectors.write_index_files(d / "faiss", prefix="items-"))
             if backend == "faiss" else None)
    manager.write_state(store.state_dict(), {"offsets": {"interactions": {"0": 41}}, "config_version": 1}, extra)
    snap = manager.latest_valid()
    assert snap.meta == {"offsets": {"interactions": {"0": 41}}, "config_version": 1}
    _assert_same_state(snap.state(), store.state_dict())
    if backend == "faiss":
        assert "faiss/items-shard-0000.faiss" in snap.files and (snap.path / "faiss" / "items-index.json").is_file()
    restored = make()
    restored.load_state_dict(snap.state())
    _assert_same_state(restored.state_dict(), store.state_dict())


def test_flatten_state_handles_nested_values_without_pickle():
    state = {"a": {"b": np.arange(6, dtype=np.int16).reshape(2, 3), "ids": ["x", "", "é"], "n": 3,
                   "f": 0.1, "none": None, "flag": True, "empty": [], "ints": [1, 2]},
             "t": torch.ones(2, 2), "obj": np.asarray(["p", "q"], dtype=object), "deep": [{"x": np.zeros(1)}]}
    arrays, spec = flatten_state(state)
    json.dumps(spec)
    assert all(a.dtype != object for a in arrays.values())
    back = unflatten_state(arrays, spec)
    assert back["a"]["ids"] == ["x", "", "é"] and back["a"]["empty"] == [] and back["a"]["ints"] == [1, 2]
    assert back["a"]["n"] == 3 and back["a"]["f"] == 0.1 and back["a"]["none"] is None and back["a"]["flag"] is True
    np.testing.assert_array_equal(back["a"]["b"], state["a"]["b"])
    assert isinstance(back["t"], torch.Tensor) and torch.equal(back["t"], state["t"])
    assert back["obj"].dtype == object and back["obj"].tolist() == ["p", "q"]
    np.testing.assert_array_equal(back["deep"][0]["x"], np.zeros(1))
    with pytest.raises(StoreError):
        flatten_state({"bad/key": 1})
    with pytest.raises(StoreError):
        flatten_state({"x": object()})


def _write(manager, value, **extra_meta):
    return manager.write({"v": np.full(1000, value, dtype=np.int64)}, {"value": value, **extra_meta})


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "missing_manifest", "missing_file", "bad_manifest"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, damage, monkeypatch):
    manager = SnapshotManager(tmp_path)
    _write(manager, 1)
    newest = _write(manager, 2)
    array = newest / "array-00000.npy"
    if damage == "flip_byte":
        _flip_byte(array)
    elif damage == "truncate":
        array.write_bytes(array.read_bytes()[:100])
    elif damage == "missing_manifest":
        (newest / "manifest.json").unlink()
    elif damage == "missing_file":
        array.unlink()
    else:
        (newest / "manifest.json").write_text("{not json")
    logged = []  # the module's logger itself: whatever logging an earlier test configured (levels, caches)
    monkeypatch.setattr(snapshot_module.log, "warning", lambda event, **fields: logged.append(event))
    snap = manager.latest_valid()
    assert snap.meta["value"] == 1 and int(snap.arrays["v"][0]) == 1
    assert "snapshot_corrupt" in logged


def test_missing_current_still_recovers_newest_verified(tmp_path):
    manager = SnapshotManager(tmp_path)
    _write(manager, 1)
    newest = _write(manager, 2)
    (tmp_path / "CURRENT").unlink()
    assert manager.latest_valid().meta["value"] == 2
    _flip_byte(newest / "array-00000.npy")
    assert manager.latest_valid().meta["value"] == 1
    assert _write(manager, 3).name == "snap-000000000003"  # seqs never reused


def test_crash_before_current_switch_keeps_old_snapshot_current(tmp_path):
    manager = SnapshotManager(tmp_path)
    _write(manager, 1)
    committed = (tmp_path / "CURRENT").read_bytes()
    _write(manager, 2)  # complete, but "crash" before the switch: CURRENT still names snap 1
    (tmp_path / "CURRENT").write_bytes(committed)
    partial = tmp_path / "snap-000000000003"  # crash while writing files: no manifest
    partial.mkdir()
    (partial / "array-00000.npy").write_bytes(b"half")
    assert manager.current_seq() == 1
    assert manager.latest_valid().meta["value"] == 1
    # the next write gets a fresh seq and clears both leftovers
    path = _write(manager, 4)
    assert path.name == "snap-000000000004" and manager.current_seq() == 4
    assert manager.snapshots() == [1, 4] and manager.latest_valid().meta["value"] == 4


def test_uncommitted_snapshot_is_last_resort_only(tmp_path):
    manager = SnapshotManager(tmp_path)
    first = _write(manager, 1)
    committed = (tmp_path / "CURRENT").read_bytes()
    _write(manager, 2)
    (tmp_path / "CURRENT").write_bytes(committed)
    _flip_byte(first / "array-00000.npy")
    assert manager.latest_valid().meta["value"] == 2  # verified and self-consistent (own offsets)


def test_retention_keeps_newest_k_complete(tmp_path):
    manager = SnapshotManager(tmp_path, keep=2)
    for value in range(1, 6):
        _write(manager, value)
    assert manager.snapshots() == [4, 5]
    assert json.loads((tmp_path / "CURRENT").read_text()) == {"seq": 5, "dir": "snap-000000000005"}
    assert not list(tmp_path.glob("*.tmp"))


def test_manifest_holds_checksums_sizes_meta_and_created_time(tmp_path):
    manager = SnapshotManager(tmp_path)
    path = manager.write({"x": np.arange(3.0)}, {"offsets": [1, 2]},
                         extra=lambda d: (d / "extra.bin").write_bytes(b"abc"))
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"array-00000.npy", "extra.bin"}
    assert manifest["files"]["extra.bin"]["size"] == 3 and len(manifest["files"]["extra.bin"]["sha256"]) == 64
    assert manifest["meta"] == {"offsets": [1, 2]} and manifest["created_at"] and manifest["seq"] == 1
    (path / "extra.bin").write_bytes(b"abd")
    assert manager.latest_valid() is None
    with pytest.raises(StoreError):
        manager.write({"ids": np.asarray(["a"], dtype=object)}, {})
    with pytest.raises(StoreError):
        manager.write({}, {"not_json": object()})


def test_empty_root_has_no_snapshot(tmp_path):
    assert SnapshotManager(tmp_path / "none").latest_valid() is None


def test_second_writer_is_refused(tmp_path):
    import fcntl
    manager = SnapshotManager(tmp_path)
    _write(manager, 1)
    with open(tmp_path / ".lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        pid = os.fork()
        if pid == 0:  # child: a second process must be refused while the lock is held
            try:
                _write(SnapshotManager(tmp_path), 2)
                os._exit(1)
            except StoreError:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("edit", ["meta", "array_index", "files"])
def test_an_edited_manifest_fails_its_own_checksum(tmp_path, edit, monkeypatch):
    manager = SnapshotManager(tmp_path)
    _write(manager, 1, offsets={"0": 10})
    newest = _write(manager, 2, offsets={"0": 20})
    manifest = json.loads((newest / "manifest.json").read_text())
    if edit == "meta":
        manifest["meta"]["offsets"]["0"] = 120
    elif edit == "array_index":
        manifest["arrays"]["w"] = manifest["arrays"].pop("v")
    else:
        del manifest["files"]["array-00000.npy"]
    (newest / "manifest.json").write_text(json.dumps(manifest))
    reasons = []
    monkeypatch.setattr(snapshot_module.log, "warning", lambda event, **fields: reasons.append(fields.get("reason")))
    assert manager.latest_valid().meta["offsets"] == {"0": 10}
    assert any("manifest checksum mismatch" in str(reason) for reason in reasons)


def test_manifests_of_format_1_are_still_read(tmp_path):
    path = _write(SnapshotManager(tmp_path), 1)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["checksum"]
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    assert SnapshotManager(tmp_path).latest_valid().meta["value"] == 1


def test_a_snapshot_pruned_while_it_is_read_is_replaced_by_the_newer_one(tmp_path, monkeypatch):
    reader, writer = SnapshotManager(tmp_path), SnapshotManager(tmp_path, keep=1)
    _write(writer, 1)
    real_load, moved = np.load, []

    def load_while_the_writer_moves_on(*args, **kwargs):
        if not moved:  # between verifying snap 1 and loading it, snap 2 commits and snap 1 is pruned
            moved.append(_write(writer, 2))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", load_while_the_writer_moves_on)
    snapshot = reader.latest_valid()
    assert moved and not (tmp_path / "snap-000000000001").exists()
    assert snapshot.seq == 2 and int(snapshot.arrays["v"][0]) == 2


def test_a_snapshot_half_pruned_between_listing_and_reading_is_replaced_by_the_newer_one(tmp_path, monkeypatch):
    """rmtree removes a pruned snapshot's files before its directory: a reader that listed it can find
    the directory without its manifest. That is the writer moving on (CURRENT changed), not corruption."""
    reader, writer = SnapshotManager(tmp_path), SnapshotManager(tmp_path, keep=1)
    first = _write(writer, 1)
    real_dirs, moved = SnapshotManager._snapshot_dirs, []

    def list_then_the_writer_moves_on(self):
        dirs = real_dirs(self)
        if self is reader and not moved:
            moved.append(_write(writer, 2))  # commits 2 and prunes 1...
            first.mkdir()  # ...whose directory is still there, empty
        return dirs

    monkeypatch.setattr(SnapshotManager, "_snapshot_dirs", list_then_the_writer_moves_on)
    snapshot = reader.latest_valid()
    assert moved and snapshot is not None and snapshot.seq == 2 and snapshot.meta["value"] == 2


def test_a_referenced_file_collected_while_its_snapshot_is_read_means_the_newer_one(tmp_path, monkeypatch):
    """The worker deletes spill files after pruning the snapshots that referred to them: a reader of
    such a snapshot finds the file gone and must move to the newer snapshot, not report none."""
    reader, writer = SnapshotManager(tmp_path), SnapshotManager(tmp_path, keep=1)
    first = writer.write({"v": np.zeros(3)}, {"value": 1}, refs=_shared_file(tmp_path, "a", b"abc"))
    real_hash, moved = snapshot_module.hash_file, []

    def hash_then_the_writer_moves_on(path, fsync):
        result = real_hash(path, fsync)
        if path.parent == first and not moved:  # the reader verified snap 1's own files
            moved.append(writer.write({"v": np.ones(3)}, {"value": 2}))  # commits 2, prunes 1
            (tmp_path / "spill" / "a").unlink()  # collected: no kept snapshot refers to it
        return result

    monkeypatch.setattr(snapshot_module, "hash_file", hash_then_the_writer_moves_on)
    snapshot = reader.latest_valid()
    assert moved and snapshot is not None and snapshot.seq == 2 and snapshot.meta["value"] == 2


def test_readers_never_fail_while_a_writer_prunes(tmp_path):
    """Reads race a writer that commits and prunes (keep=1) until the reader has seen 25 different
    snapshots, so they overlap whatever the machine's load (not a fixed number of writes that a
    slow reader might not overlap at all)."""
    writer, reader = SnapshotManager(tmp_path, keep=1), SnapshotManager(tmp_path)
    _write(writer, 0)
    stop, errors, seen, failures = threading.Event(), [], set(), []

    def write_until_stopped() -> None:
        try:
            value = 0
            while not stop.is_set():
                value += 1
                _write(writer, value)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def read_once() -> bool:
        """True when done: 25 values seen, or a failed read (recorded: wait_for would swallow it)."""
        try:
            snapshot = reader.latest_valid()  # must neither raise nor return None or a mixed snapshot
            assert snapshot is not None and (snapshot.arrays["v"] == snapshot.meta["value"]).all()
            seen.add(snapshot.meta["value"])
        except BaseException as exc:
            failures.append(exc)
        return bool(failures or errors) or len(seen) >= 25

    thread = threading.Thread(target=write_until_stopped)
    thread.start()
    try:
        wait_for(read_once, 120, "the reader saw 25 snapshots of the pruning writer", interval_s=0)
    finally:
        stop.set()
        thread.join()
    assert not failures and not errors and len(seen) >= 25


def test_acquire_holds_the_directory_for_the_writers_whole_life(tmp_path):
    first, second = SnapshotManager(tmp_path), SnapshotManager(tmp_path)
    first.acquire()
    _write(first, 1)  # the holder itself writes
    with pytest.raises(StoreError, match=f"in use by another writer \\(pid {os.getpid()}\\)"):
        second.acquire()
    with pytest.raises(StoreError, match="in use"):
        _write(second, 2)
    first.release()
    second.acquire()
    _write(second, 2)
    second.release()


_ORPHAN = '''
import os, sys, time
from felrec_stream.state.snapshot import SnapshotManager
if os.fork() == 0:
    writer = SnapshotManager(sys.argv[1])
    writer.acquire()
    print(os.getpid(), flush=True)
    time.sleep(600)
'''


def test_a_lock_held_by_an_orphan_says_so(tmp_path):
    """A writer whose parent died (a rank of a killed `--nproc` run) is named an orphan, with how to stop it."""
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    orphan = int(proc.stdout.readline())  # the forked child holds the lock; its parent exits
    try:
        assert proc.wait(timeout=60) == 0
        with pytest.raises(StoreError, match=f"in use by another writer \\(pid {orphan}\\).*orphan.*kill {orphan}"):
            SnapshotManager(tmp_path).acquire()
    finally:
        os.kill(orphan, signal.SIGKILL)


def test_a_bad_directory_fails_at_acquire_in_one_line(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a directory"):
        SnapshotManager(a_file).acquire()
    with pytest.raises(StoreError, match="not writable: Not a directory"):
        SnapshotManager(a_file / "below").acquire()

    def disk_full(path, payload):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(snapshot_module, "write_durable", disk_full)
    with pytest.raises(StoreError, match="not writable: No space left on device"):
        SnapshotManager(tmp_path / "full").acquire()


def test_a_failed_write_leaves_the_previous_snapshot_current(tmp_path, monkeypatch):
    manager = SnapshotManager(tmp_path)
    _write(manager, 1)
    real = durable_module.write_durable

    def full_at_the_manifest(path, payload):
        if path.name.startswith("manifest"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, payload)

    monkeypatch.setattr(durable_module, "write_durable", full_at_the_manifest)  # atomic_json writes the manifest
    with pytest.raises(StoreError, match="cannot write snapshot .*No space left on device.*previous snapshot stays"):
        _write(manager, 2)
    assert manager.snapshots() == [1] and manager.latest_valid().meta["value"] == 1


def _shared_file(root, name, data: bytes) -> dict:
    path = root / "spill" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {f"spill/{name}": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped"])
def test_a_snapshot_whose_referenced_file_is_damaged_is_skipped(tmp_path, damage):
    manager = SnapshotManager(tmp_path)
    manager.write({"v": np.zeros(3)}, {"value": 1}, refs=_shared_file(tmp_path, "a", b"abc"))
    manager.write({"v": np.ones(3)}, {"value": 2}, refs={**_shared_file(tmp_path, "a", b"abc"),
                                                         **_shared_file(tmp_path, "b", b"defg")})
    if damage == "missing":
        (tmp_path / "spill" / "b").unlink()
    elif damage == "truncated":
        (tmp_path / "spill" / "b").write_bytes(b"de")
    else:  # same size, other content
        (tmp_path / "spill" / "b").write_bytes(b"dexg")
    snap = manager.latest_valid()
    assert snap.meta["value"] == 1 and snap.refs == _shared_file(tmp_path, "a", b"abc")


def test_pruning_keeps_referenced_files_and_reports_what_kept_snapshots_need(tmp_path):
    manager = SnapshotManager(tmp_path, keep=2)
    for n in range(4):
        manager.write({"v": np.full(2, n)}, {}, refs=_shared_file(tmp_path, f"f{n}", b"x" * (n + 1)))
    assert manager.snapshots() == [3, 4]
    assert manager.referenced() == {"spill/f2", "spill/f3"}  # the owner may delete f0 and f1
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["f0", "f1", "f2", "f3"]  # never by pruning


@pytest.mark.parametrize("ref", ["/abs/file", "../outside", "snap-000000000001/x", "spill/missing"])
def test_refs_must_be_existing_files_below_the_root_outside_snapshots(tmp_path, ref):
    with pytest.raises(StoreError):
        SnapshotManager(tmp_path).write({}, {}, refs={ref: {"sha256": "0" * 64, "size": 1}})
