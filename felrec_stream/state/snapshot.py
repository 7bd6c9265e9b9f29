"""Exactly-once snapshots: durable, checksummed, atomically committed directories of arrays + meta.

The streaming worker stores its Kafka offsets *inside* each snapshot (in `meta`), next to the
cache state, and commits offsets to Kafka only after the snapshot is durable. After a crash it
restores the newest valid snapshot and resumes from the offsets recorded there, so every event is
applied exactly once whatever Kafka itself did (the embedded broker's transactions are unusable).

Layout under `root`:

    snap-000000000007/            one snapshot (seq 7)
        array-00000.npy ...       one .npy per array (allow_pickle=False: no pickle anywhere)
        <extra files>             written by a callback (e.g. FAISS index files)
        manifest.json             written last: sha256 + size of every file, array index, meta,
                                  and `checksum`, the sha256 of the manifest itself (canonical JSON)
    CURRENT                       {"seq": 7, "dir": "snap-000000000007"}: the commit point
    .lock                         the writer's lock (pid inside)
    spill/...                     immutable files shared by snapshots ("refs", e.g. spill files)

Write protocol: files (each fsynced) -> manifest (tmp + fsync + rename) -> fsync the directory ->
CURRENT.tmp + fsync + os.replace -> fsync root -> delete all but the newest `keep` complete
snapshots. A crash before the CURRENT switch leaves the previous snapshot current. Reading walks
committed snapshots newest first and skips (logging `snapshot_corrupt`) any whose manifest is
missing, fails its own checksum, or whose files fail theirs: an edited offset or a swapped array
entry is caught like a flipped bit. Each file is read once, checked and parsed from the same
bytes. A snapshot directory that vanishes while it is read (a writer pruned it) means a newer one
was committed: the reader starts over from CURRENT.

Refs: files under `root` outside any snapshot directory that a snapshot's state refers to
(immutable, written and fsynced by their owner before the snapshot). The manifest lists them with
size and sha256 (covered by the manifest's own checksum); a snapshot whose ref is missing or has
another size is skipped like a corrupt one (the owner checks their content when it reads them);
pruning never deletes them, and `referenced()` tells the owner which ones kept snapshots need.

One writer per root: `acquire()` takes an exclusive lock for the writer's whole life (the worker
holds it from start to exit) after checking that the root is a writable directory; `write()`
without it takes the lock for the one write.
"""

from __future__ import annotations

import contextlib
import functools
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import numpy as np

from felrec_stream.errors import StoreError
from felrec_stream.faults import fault_point
from felrec_stream.log import get_logger
from felrec_stream.state.codec import flatten_state, unflatten_state
from felrec_stream.state.durable import atomic_json, fsync_dir, hash_file, hash_handle, write_durable
from felrec_stream.state.meta import lineage_of

log = get_logger(__name__)

FORMAT_VERSION = 2  # 2: the manifest carries its own checksum
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
LOCK = ".lock"
_SNAP_RE = re.compile(r"^snap-(\d{12})$")
_RESCANS = 20  # starts-over after a snapshot vanished mid-read, before giving up
_PROBE_BYTES = 1 << 16


def _save_array(array: np.ndarray, f: Any) -> None:
    np.save(f, array, allow_pickle=False)


# ---- snapshots ----------------------------------------------------------------------------------

@dataclass
class Snapshot:
    """A verified snapshot: its arrays, the caller's meta, and where its extra files lie."""

    path: Path
    seq: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    created_at: str
    files: list[str] = field(default_factory=list)
    state_spec: Any = None
    refs: dict[str, Any] = field(default_factory=dict)  # root-relative path -> {"sha256", "size"}
    # root-relative path -> an open binary handle (SnapshotManager(pin_refs=True)): the file stays
    # readable through it after the writer prunes it (a reader pins what it reads)
    pinned: dict[str, BinaryIO] = field(default_factory=dict)

    def state(self) -> Any:
        """The nested state written by `SnapshotManager.write_state`."""
        if self.state_spec is None:
            raise StoreError(f"snapshot {self.path.name} holds plain arrays, not a nested state")
        return unflatten_state(self.arrays, self.state_spec)

    @property
    def lineage(self) -> str | None:
        """meta["lineage"]: the writer's history id (a writer that starts from scratch begins a new one)."""
        return lineage_of(self.meta)


class SnapshotCorrupt(StoreError):
    """A snapshot that must be skipped for an older one (reason in the message)."""


class _Vanished(StoreError):
    """A snapshot directory disappeared while it was read: the writer pruned it after a newer commit."""


class _Missing(SnapshotCorrupt):
    """A file of a snapshot is absent: corrupt, unless the writer is pruning it (then `_Vanished`)."""


# Errors of a loader that mean "this snapshot is unusable, try the previous one".
LOAD_ERRORS: tuple[type[BaseException], ...] = (SnapshotCorrupt, ValueError, KeyError, TypeError, IndexError)
Accept = Callable[[int, Mapping[str, Any]], bool]


class SnapshotManager:
    """Writes and finds snapshots under `root`, keeping the newest `keep` complete ones."""

    def __init__(self, root: str | Path, keep: int = 3, pin_refs: bool = False) -> None:
        if keep < 1:
            raise StoreError(f"keep must be >= 1, got {keep}")
        self.root, self.keep = Path(root), keep
        self.pin_refs = pin_refs  # readers: open every referenced file while verifying (Snapshot.pinned)
        self._lock_handle: Any = None

    # -- the writer's lock --

    def acquire(self) -> None:
        """Hold the writer lock until `release()`: one writer per root for the writer's whole life.

        Checks first that root is (or can be made) a writable directory with room for a small
        file, so a bad snapshot directory fails at start, in one line, before any event is applied.
        """
        if self._lock_handle is None:
            self._check_writable()
            self._lock_handle = self._lock()

    def release(self) -> None:
        handle, self._lock_handle = self._lock_handle, None
        if handle is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()

    def _check_writable(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"snapshot directory {self.root} is a file, not a directory")
        probe = self.root / f".probe-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_durable(probe, lambda f: f.write(bytes(_PROBE_BYTES)))
        except OSError as exc:
            raise StoreError(f"snapshot directory {self.root} is not writable: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()

    def _lock(self) -> Any:
        """The exclusive lock on root/.lock (our pid written inside for the next one's message)."""
        try:
            handle = open(self.root / LOCK, "a+")
        except OSError as exc:
            raise StoreError(f"cannot lock snapshot directory {self.root}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder, _, ancestry = handle.read().strip().partition("\n")
            handle.close()
            raise StoreError(f"snapshot directory {self.root} is in use by another writer (pid {holder or '?'}): "
                             f"one worker per snapshot directory{_orphan_note(holder, ancestry)}") from None
        with contextlib.suppress(OSError):  # informative only: the pid, and its ancestors for `_orphan_note`
            handle.truncate(0)
            handle.write(f"{os.getpid()}\nancestors {' '.join(map(str, _ancestors(os.getpid())))}\n")
            handle.flush()
        return handle

    @contextlib.contextmanager
    def _writer_lock(self) -> Iterator[None]:
        """The lock for one write, unless `acquire()` holds it already (flock would refuse us)."""
        if self._lock_handle is not None:
            yield
            return
        handle = self._lock()
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()

    # -- write --

    def write(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
              extra: Callable[[Path], Any] | None = None, refs: Mapping[str, Any] | None = None) -> Path:
        """Durably write a new snapshot and make it current; returns its directory.

        `meta` (JSON-able: offsets, model/config versions) is stored in the manifest with a
        created time. `extra(dir)` may write more files into the snapshot directory first; they
        are fsynced and checksummed like the arrays. A failed write (disk full, I/O error) removes
        its directory and raises StoreError; the previous snapshot stays current. `refs`: {root-relative
        path: {"sha256", "size"}} of durable files outside the snapshot that its state needs
        (module docstring).
        """
        return self._write(arrays, meta, extra, None, refs)

    def write_state(self, state: Mapping[str, Any], meta: Mapping[str, Any],
                    extra: Callable[[Path], Any] | None = None, refs: Mapping[str, Any] | None = None) -> Path:
        """`write` for a nested state (e.g. RepresentationStore.state_dict()); read back with Snapshot.state()."""
        arrays, spec = flatten_state(state)
        return self._write(arrays, meta, extra, spec, refs)

    def _write(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
               extra: Callable[[Path], Any] | None, spec: Any, refs: Mapping[str, Any] | None) -> Path:
        start = time.perf_counter()
        meta = _json_checked(meta, "meta")
        refs = self._checked_refs(refs or {})
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create snapshot directory {self.root}: {exc.strerror or exc}") from None
        with self._writer_lock():
            previous = self.current_seq()
            seq = self._next_seq()
            path = self.root / f"snap-{seq:012d}"
            try:
                files, index = self._write_files(path, arrays, extra)
                fault_point("snapshot_files_written")
                manifest = {"format": FORMAT_VERSION, "seq": seq, "created_at": _now(), "files": files,
                            "arrays": index, "meta": meta, "state": spec, "refs": refs}
                atomic_json(path / MANIFEST, {**manifest, "checksum": _manifest_checksum(manifest)})
                fsync_dir(path)
                fault_point("snapshot_manifest_written")
                self._commit(seq, path)
            except OSError as exc:
                shutil.rmtree(path, ignore_errors=True)
                raise StoreError(f"cannot write snapshot {path}: {exc.strerror or exc}; "
                                 "the previous snapshot stays current") from None
            fault_point("snapshot_committed")
            self._prune(seq, previous)
        size = sum(f["size"] for f in files.values())
        log.info("snapshot_written", seq=seq, path=str(path), files=len(files), bytes=size,
                 seconds=round(time.perf_counter() - start, 3))
        return path

    def _checked_refs(self, refs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Refs as {posix path: {"sha256", "size"}}, each an existing file below root, outside snapshots."""
        out = {}
        for name, info in refs.items():
            relative = Path(name)
            if relative.is_absolute() or ".." in relative.parts or _SNAP_RE.match(relative.parts[0]):
                raise StoreError(f"snapshot ref {name!r} must be a relative path below the root, outside snapshots")
            try:
                size = (self.root / relative).stat().st_size
            except FileNotFoundError:
                raise StoreError(f"snapshot ref {name} does not exist under {self.root}") from None
            if size != int(info["size"]):
                raise StoreError(f"snapshot ref {name}: size {size} != {info['size']}")
            out[relative.as_posix()] = {"sha256": str(info["sha256"]), "size": size}
        return out

    def referenced(self) -> set[str]:
        """Root-relative refs of every snapshot directory with a readable manifest (kept ones)."""
        refs: set[str] = set()
        for _, path in self._snapshot_dirs():
            try:
                manifest = json.loads((path / MANIFEST).read_text())
                refs.update(manifest.get("refs", {}))
            except (OSError, ValueError, AttributeError):
                continue  # incomplete or unreadable: pruned, never restored
        return refs

    def _write_files(self, path: Path, arrays: Mapping[str, np.ndarray],
                     extra: Callable[[Path], Any] | None) -> tuple[dict[str, Any], dict[str, str]]:
        """Arrays and extra files, each fsynced; returns ({file: size + sha256}, {array key: file})."""
        path.mkdir()
        files: dict[str, Any] = {}
        index: dict[str, str] = {}
        for n, (key, array) in enumerate(arrays.items()):
            array = np.asarray(array)
            if array.dtype == object:
                raise StoreError(f"array {key!r} has dtype object: use flatten_state (no pickle)")
            name = f"array-{n:05d}.npy"
            files[name] = write_durable(path / name, functools.partial(_save_array, array))
            index[key] = name
        if extra is not None:
            extra(path)
            files.update(self._seal_extra_files(path, files))
        return files, index

    def _seal_extra_files(self, path: Path, known: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """fsync + checksum every file the callback wrote (and fsync its directories)."""
        sealed: dict[str, dict[str, Any]] = {}
        for item in sorted(path.rglob("*")):
            relative = item.relative_to(path).as_posix()
            if item.is_dir():
                fsync_dir(item)
            elif relative not in known and relative != MANIFEST:
                sealed[relative] = hash_file(item, fsync=True)
        return sealed

    def _commit(self, seq: int, path: Path) -> None:
        atomic_json(self.root / CURRENT, {"seq": seq, "dir": path.name})
        fsync_dir(self.root)

    def _prune(self, current: int, previous: int | None) -> None:
        """Keep the newest `keep` complete committed snapshots; drop older, partial and crashed ones.

        Directories between the previous and the new CURRENT were never committed (a crash
        before the switch): they go too, so "seq <= CURRENT" keeps meaning "committed". A failure
        here is logged only: the new snapshot is committed already.
        """
        def crashed(seq: int) -> bool:
            return previous is not None and previous < seq < current

        complete = [s for s, p in self._snapshot_dirs()
                    if s <= current and not crashed(s) and (p / MANIFEST).is_file()]
        keep = set(sorted(complete)[-self.keep:])
        try:
            for seq, path in self._snapshot_dirs():
                if seq <= current and seq not in keep:
                    shutil.rmtree(path, ignore_errors=True)
                    log.info("snapshot_deleted", seq=seq, path=str(path))
                    fault_point("snapshot_pruning")
            fsync_dir(self.root)
        except OSError as exc:
            log.warning("snapshot_prune_failed", root=str(self.root), error=str(exc))

    def discard_all(self) -> int:
        """Delete every snapshot and CURRENT (an explicit reset); returns how many were deleted."""
        with self._writer_lock():
            dirs = self._snapshot_dirs()
            (self.root / CURRENT).unlink(missing_ok=True)
            for _, path in dirs:
                shutil.rmtree(path, ignore_errors=True)
            fsync_dir(self.root)
        log.warning("snapshots_discarded", root=str(self.root), count=len(dirs))
        return len(dirs)

    def _next_seq(self) -> int:
        """1 + the highest seq seen anywhere, partial directories included (never reused)."""
        seqs = [seq for seq, _ in self._snapshot_dirs()]
        current = self.current_seq()
        return max(seqs + ([current] if current is not None else []) + [0]) + 1

    # -- read --

    def current_seq(self) -> int | None:
        """The committed seq named by CURRENT, or None when CURRENT is missing or unreadable."""
        try:
            value = json.loads((self.root / CURRENT).read_text())
            return int(value["seq"])
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("snapshot_current_unreadable", root=str(self.root), error=str(exc))
            return None

    def snapshots(self) -> list[int]:
        """Seqs of every snapshot directory (complete or not), ascending."""
        return [seq for seq, _ in self._snapshot_dirs()]

    def has_committed(self) -> bool:
        """True when a snapshot was committed here at some point (CURRENT or a manifest exists)."""
        return (self.root / CURRENT).exists() or any((p / MANIFEST).exists() for _, p in self._snapshot_dirs())

    def _snapshot_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _SNAP_RE.match(p.name)) and p.is_dir()]
        return sorted(found)

    def latest_valid(self) -> Snapshot | None:
        """Newest committed snapshot that verifies; older ones when it is corrupt or partial.

        Committed = seq <= CURRENT. Without a readable CURRENT every complete snapshot counts
        (each one holds its own offsets, so any verified one is a consistent restart point).
        Newer, uncommitted ones are a last resort only.
        """
        found = self.load_newest()
        return None if found is None else found[0]

    def load_newest(self, loader: Callable[[Snapshot], Any] | None = None, accept: Accept | None = None,
                    skip: tuple[type[BaseException], ...] = LOAD_ERRORS) -> tuple[Snapshot, Any] | None:
        """(snapshot, loader(snapshot)) for the newest snapshot that verifies *and* loads; None if none.

        Candidates go newest first as in `latest_valid`. `accept(seq, meta)`, asked before the
        files are verified, ends the search when False (e.g. "not newer than what I serve").
        A `loader` error of a `skip` type marks the snapshot unusable (logged as
        `snapshot_corrupt`; the previous one is tried); other errors propagate. When a directory
        vanishes mid-read (pruned after a newer commit), the search starts over from CURRENT.
        """
        for _ in range(_RESCANS):
            try:
                return self._search(loader, accept, skip)
            except _Vanished as exc:
                log.info("snapshot_vanished", path=str(exc), hint="pruned after a newer commit; reading again")
        raise StoreError(f"snapshots under {self.root} kept vanishing while being read ({_RESCANS} tries)")

    def _search(self, loader: Callable[[Snapshot], Any] | None, accept: Accept | None,
                skip: tuple[type[BaseException], ...]) -> tuple[Snapshot, Any] | None:
        current = self.current_seq()
        dirs = sorted(self._snapshot_dirs(), reverse=True)
        if current is None and dirs:
            log.warning("snapshot_current_missing", root=str(self.root))
        committed = [d for d in dirs if current is None or d[0] <= current]
        uncommitted = [d for d in dirs if current is not None and d[0] > current]
        for seq, path in committed + uncommitted:
            try:
                snapshot = self._load(seq, path, current, accept)
                if snapshot is None:
                    return None
                value = loader(snapshot) if loader is not None else None
            except _Vanished:
                raise
            except skip as exc:
                reason = (str(exc) if isinstance(exc, SnapshotCorrupt)
                          else f"cannot be loaded: {type(exc).__name__}: {exc}")
                log.warning("snapshot_corrupt", seq=seq, path=str(path), reason=reason[:500])
                continue
            event = "snapshot_restored" if current is None or seq <= current else "snapshot_uncommitted_used"
            log.info(event, seq=seq, path=str(path), committed_seq=current)
            return snapshot, value
        log.info("snapshot_none", root=str(self.root))
        return None

    def _load(self, seq: int, path: Path, current: int | None, accept: Accept | None) -> Snapshot | None:
        """Read and verify one snapshot (None when `accept` declines it); a file that disappears
        raises _Vanished when the writer has moved on (CURRENT changed), SnapshotCorrupt otherwise."""
        try:
            manifest = self._manifest(path, seq)
            if accept is not None and not accept(seq, manifest["meta"]):
                return None
            arrays, pinned = self._verified_arrays(path, manifest)
        except (FileNotFoundError, _Missing) as exc:
            # Pruning removes the files (the manifest among them, in any order), then the directory,
            # then the spill files only it referred to; all after CURRENT moved on.
            if not path.is_dir() or self.current_seq() != current:
                raise _Vanished(str(path)) from None
            if isinstance(exc, _Missing):
                raise
            raise SnapshotCorrupt(f"missing file {Path(exc.filename or '?').name}") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise SnapshotCorrupt(f"malformed manifest: {type(exc).__name__}: {exc}") from None
        return Snapshot(path, seq, arrays, manifest["meta"], manifest["created_at"], sorted(manifest["files"]),
                        manifest.get("state"), manifest.get("refs", {}), pinned)

    def _manifest(self, path: Path, seq: int) -> dict[str, Any]:
        """The manifest after checking its own checksum and seq (FileNotFoundError passes through)."""
        if not (path / MANIFEST).exists() and path.is_dir():
            raise _Missing("no manifest (incomplete snapshot)")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except ValueError as exc:
            raise SnapshotCorrupt(f"unreadable manifest: {exc}") from None
        if not isinstance(manifest, dict):
            raise SnapshotCorrupt("manifest is not a JSON object")
        if manifest.get("format") == 1:  # written before manifests carried their own checksum
            log.warning("snapshot_manifest_unchecked", seq=seq, path=str(path), format=1)
        elif manifest.get("format") != FORMAT_VERSION:
            raise SnapshotCorrupt(f"unknown format {manifest.get('format')!r}")
        elif manifest.get("checksum") != _manifest_checksum(manifest):
            raise SnapshotCorrupt("manifest checksum mismatch (the manifest was edited or damaged)")
        if manifest.get("seq") != seq:
            raise SnapshotCorrupt(f"manifest seq {manifest.get('seq')} != directory seq {seq}")
        return manifest

    def _verified_arrays(self, path: Path,
                         manifest: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, BinaryIO]]:
        """Check every file's size and sha256, then load the arrays (files never change once written);
        with `pin_refs`, also an open handle on every referenced file."""
        files = manifest["files"]
        for name, expected in files.items():
            file = path / name
            size = file.stat().st_size
            if size != expected["size"]:
                raise SnapshotCorrupt(f"size mismatch in {name}: {size} != {expected['size']}")
            if hash_file(file, fsync=False)["sha256"] != expected["sha256"]:
                raise SnapshotCorrupt(f"checksum mismatch in {name}")
        missing = set(manifest["arrays"].values()) - set(files)
        if missing:
            raise SnapshotCorrupt(f"arrays without checksums: {sorted(missing)}")
        pinned: dict[str, BinaryIO] = {}
        try:
            for name, expected in manifest.get("refs", {}).items():
                file = path.parent / name  # refs are relative to the root
                if not file.is_file():
                    raise _Missing(f"missing referenced file {name}")
                if self.pin_refs:
                    try:
                        pinned[name] = open(file, "rb")
                    except FileNotFoundError:
                        raise _Missing(f"missing referenced file {name}") from None
                    size = os.fstat(pinned[name].fileno()).st_size
                else:
                    size = file.stat().st_size
                if size != expected["size"]:
                    raise SnapshotCorrupt(f"size mismatch in referenced file {name}")
                # content too: a damaged spill file of the same size must make this snapshot unusable
                # here (the previous one is then used), not fail every later read of it
                digest = hash_handle(pinned[name]) if name in pinned else hash_file(file, fsync=False)["sha256"]
                if digest != expected["sha256"]:
                    raise SnapshotCorrupt(f"checksum mismatch in referenced file {name}")
            try:
                arrays = {key: np.load(path / name, allow_pickle=False) for key, name in manifest["arrays"].items()}
            except ValueError as exc:
                raise SnapshotCorrupt(f"unreadable array file: {exc}") from None
        except BaseException:
            for handle in pinned.values():
                handle.close()
            raise
        return arrays, pinned


def _manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest without its checksum field, as canonical JSON."""
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _json_checked(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"snapshot {what} must be JSON-serialisable: {exc}") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _ancestors(pid: int) -> list[int]:
    """The parent, grandparent, ... of `pid` (Linux /proc; [] elsewhere or once unreadable)."""
    chain: list[int] = []
    while len(chain) < 64:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # after the (comm) field: state, ppid
        except (OSError, ValueError, IndexError):
            break
        if pid <= 0:
            break
        chain.append(pid)
    return chain


def _orphan_note(holder: str, ancestry: str) -> str:
    """A clause for the lock message when the holder lost an ancestor it had when it locked: a rank of
    a `--nproc` run whose launcher or torchrun was killed, left consuming on its own."""
    recorded = ancestry.removeprefix("ancestors").split()
    if not holder.isdigit() or not recorded:
        return ""
    now = set(map(str, _ancestors(int(holder))))
    if not now:
        return ""  # gone meanwhile, or not readable here
    lost = [pid for pid in recorded if pid not in now and pid != "1"]
    if not lost:
        return ""
    return (f"; pid {holder} is an orphan (its ancestor pid {lost[0]} that started it has exited: a rank of a "
            f"killed --nproc run?): stop it with `kill {holder}` if it is not meant to run")
