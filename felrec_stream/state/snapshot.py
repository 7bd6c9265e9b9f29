"""Exactly-once snapshots: durable, checksummed, atomically committed directories of arrays + meta.

The streaming worker stores its Kafka offsets *inside* each snapshot (in `meta`), next to the
cache state, and commits offsets to Kafka only after the snapshot is durable. After a crash it
restores the newest valid snapshot and resumes from the offsets recorded there, so every event is
applied exactly once whatever Kafka itself did (the embedded broker's transactions are unusable).

Layout under `root`:

    snap-000000000007/            one snapshot (seq 7)
        array-00000.npy ...       one .npy per array (allow_pickle=False: no pickle anywhere)
        <extra files>             written by a callback (e.g. FAISS index files)
        manifest.json             written last: sha256 + size of every file, array index, meta
    CURRENT                       {"seq": 7, "dir": "snap-000000000007"}: the commit point
    spill/...                     immutable files shared by snapshots ("refs", e.g. spill files)

Refs: files under `root` outside any snapshot directory that a snapshot's state refers to
(immutable, written and fsynced by their owner before the snapshot). The manifest lists them with
size and sha256; `verify` checks that they exist with that size (a missing one makes the snapshot
invalid; their content is checked by the owner when it reads them); pruning never deletes them,
and `referenced()` tells the owner which ones kept snapshots still need.

Write protocol: files (each fsynced) -> manifest (tmp + fsync + rename) -> fsync the directory ->
CURRENT.tmp + fsync + os.replace -> fsync root -> delete all but the newest `keep` complete
snapshots. A crash before the CURRENT switch leaves the previous snapshot current. Reading walks
committed snapshots newest first and skips (logging `snapshot_corrupt`) any whose manifest is
missing or whose files fail their checksums. One writer per root (enforced with a lock file).
"""

from __future__ import annotations

import contextlib
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
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from felrec_stream.errors import StoreError
from felrec_stream.log import get_logger

log = get_logger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
_SNAP_RE = re.compile(r"^snap-(\d{12})$")
_CHUNK = 1 << 20


# ---- nested state <-> flat arrays + JSON spec ---------------------------------------------------

def flatten_state(state: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Split a nested state (dicts, numpy arrays, tensors, str lists, JSON scalars) into
    (arrays keyed by path, JSON-able spec) so `unflatten_state` rebuilds it exactly.

    Why not pickle: snapshots outlive code versions and are read after crashes; .npy + JSON are
    inspectable and cannot execute code. String lists (entity ids) become UTF-8 bytes + offsets
    arrays (compact, no per-id JSON overhead). Tuples come back as lists.
    """
    arrays: dict[str, np.ndarray] = {}
    spec = _flatten(state, "", arrays)
    return arrays, spec


def unflatten_state(arrays: Mapping[str, np.ndarray], spec: Any) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(spec, list):
        return [unflatten_state(arrays, item) for item in spec]
    if not isinstance(spec, dict):
        return spec
    if "__array__" in spec:
        return arrays[spec["__array__"]]
    if "__tensor__" in spec:
        return torch.from_numpy(np.array(arrays[spec["__tensor__"]]))
    if "__strings__" in spec:
        strings = _decode_strings(arrays, spec["__strings__"])
        return np.asarray(strings, dtype=object) if spec.get("as") == "ndarray" else strings
    return {key: unflatten_state(arrays, value) for key, value in spec.items()}


def _flatten(value: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, Mapping):
        return {key: _flatten(item, _child(path, key), arrays) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        arrays[path] = value.detach().cpu().numpy()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return _encode_strings(value.tolist(), path, arrays, "ndarray")
        arrays[path] = value
        return {"__array__": path}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(item, str) for item in value):
            return _encode_strings(list(value), path, arrays, "list")
        return [_flatten(item, f"{path}/{n}", arrays) for n, item in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise StoreError(f"cannot snapshot {type(value).__name__} at {path or '<root>'}")


def _child(path: str, key: Any) -> str:
    if not isinstance(key, str) or "/" in key or key.startswith("__"):
        raise StoreError(f"state keys must be str without '/' or leading '__', got {key!r} under {path or '<root>'}")
    return f"{path}/{key}" if path else key


def _encode_strings(strings: list, path: str, arrays: dict[str, np.ndarray], kind: str) -> dict[str, Any]:
    if not all(isinstance(s, str) for s in strings):
        raise StoreError(f"object array at {path} must hold only str")
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    arrays[f"{path}#utf8"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    arrays[f"{path}#offsets"] = offsets
    return {"__strings__": path, "as": kind}


def _decode_strings(arrays: Mapping[str, np.ndarray], path: str) -> list[str]:
    data = arrays[f"{path}#utf8"].tobytes()
    offsets = arrays[f"{path}#offsets"].tolist()
    return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]


# ---- durable file helpers -----------------------------------------------------------------------

class _HashingFile:
    """File-like sink that hashes what it writes, so each file is read/written once."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.sha, self.size = handle, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += len(view)
        return self.handle.write(view)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new, renamed, deleted files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, payload: Callable[[Any], None]) -> dict[str, Any]:
    """Write through `payload(file)`, flush + fsync; returns {"sha256", "size"}."""
    with open(path, "wb") as handle:
        sink = _HashingFile(handle)
        payload(sink)
        handle.flush()
        os.fsync(handle.fileno())
    return {"sha256": sink.sha.hexdigest(), "size": sink.size}


def hash_file(path: Path, fsync: bool) -> dict[str, Any]:
    """{"sha256", "size"} of an existing file, read once in chunks (fsynced first when asked)."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(handle.fileno())
    return {"sha256": sha.hexdigest(), "size": size}


def _atomic_json(path: Path, value: Any) -> None:
    """tmp + fsync + os.replace: readers see the old or the new content, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(value, indent=1, sort_keys=True).encode("utf-8")
    _write_durable(tmp, lambda f: f.write(text))
    os.replace(tmp, path)


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

    def state(self) -> Any:
        """The nested state written by `SnapshotManager.write_state`."""
        if self.state_spec is None:
            raise StoreError(f"snapshot {self.path.name} holds plain arrays, not a nested state")
        return unflatten_state(self.arrays, self.state_spec)


class _Corrupt(StoreError):
    """A snapshot directory that must be skipped (reason in the message)."""


class SnapshotManager:
    """Writes and finds snapshots under `root`, keeping the newest `keep` complete ones."""

    def __init__(self, root: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise StoreError(f"keep must be >= 1, got {keep}")
        self.root, self.keep = Path(root), keep

    # -- write --

    def write(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
              extra: Callable[[Path], Any] | None = None, refs: Mapping[str, Any] | None = None) -> Path:
        """Durably write a new snapshot and make it current; returns its directory.

        `meta` (JSON-able: offsets, model/config versions) is stored in the manifest with a
        created time. `extra(dir)` may write more files into the snapshot directory first; they
        are fsynced and checksummed like the arrays. `refs`: {root-relative path: {"sha256",
        "size"}} of durable files outside the snapshot that its state needs (module docstring).
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
        self.root.mkdir(parents=True, exist_ok=True)
        with self._writer_lock():
            previous = self.current_seq()
            seq = self._next_seq()
            path = self.root / f"snap-{seq:012d}"
            path.mkdir()
            files, index = self._write_arrays(path, arrays)
            if extra is not None:
                extra(path)
                files.update(self._seal_extra_files(path, files))
            manifest = {"format": FORMAT_VERSION, "seq": seq, "created_at": _now(), "files": files,
                        "arrays": index, "meta": meta, "state": spec, "refs": refs}
            _atomic_json(path / MANIFEST, manifest)
            fsync_dir(path)
            self._commit(seq, path)
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
                refs.update(json.loads((path / MANIFEST).read_text()).get("refs", {}))
            except (OSError, ValueError):
                continue  # incomplete or unreadable: pruned, never restored
        return refs

    def _write_arrays(self, path: Path, arrays: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
        files: dict[str, dict[str, Any]] = {}
        index: dict[str, str] = {}
        for n, (key, array) in enumerate(arrays.items()):
            array = np.asarray(array)
            if array.dtype == object:
                raise StoreError(f"array {key!r} has dtype object: use flatten_state (no pickle)")
            name = f"array-{n:05d}.npy"
            files[name] = _write_durable(path / name, lambda f, a=array: np.save(f, a, allow_pickle=False))
            index[key] = name
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
        _atomic_json(self.root / CURRENT, {"seq": seq, "dir": path.name})
        fsync_dir(self.root)

    def _prune(self, current: int, previous: int | None) -> None:
        """Keep the newest `keep` complete committed snapshots; drop older, partial and crashed ones.

        Directories between the previous and the new CURRENT were never committed (a crash
        before the switch): they go too, so "seq <= CURRENT" keeps meaning "committed".
        """
        def crashed(seq: int) -> bool:
            return previous is not None and previous < seq < current

        complete = [s for s, p in self._snapshot_dirs()
                    if s <= current and not crashed(s) and (p / MANIFEST).is_file()]
        keep = set(sorted(complete)[-self.keep:])
        for seq, path in self._snapshot_dirs():
            if seq <= current and seq not in keep:
                shutil.rmtree(path, ignore_errors=True)
                log.info("snapshot_deleted", seq=seq, path=str(path))
        fsync_dir(self.root)

    @contextlib.contextmanager
    def _writer_lock(self) -> Iterator[None]:
        """One writer per root: a second worker writing here would break exactly-once."""
        with open(self.root / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"another process is writing snapshots under {self.root}") from None
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

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
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("snapshot_current_unreadable", root=str(self.root), error=str(exc))
            return None

    def snapshots(self) -> list[int]:
        """Seqs of every snapshot directory (complete or not), ascending."""
        return [seq for seq, _ in self._snapshot_dirs()]

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
        current = self.current_seq()
        dirs = sorted(self._snapshot_dirs(), reverse=True)
        if current is None and dirs:
            log.warning("snapshot_current_missing", root=str(self.root))
        committed = [d for d in dirs if current is None or d[0] <= current]
        uncommitted = [d for d in dirs if current is not None and d[0] > current]
        for seq, path in committed + uncommitted:
            try:
                snapshot = self._load(seq, path)
            except _Corrupt as exc:
                log.warning("snapshot_corrupt", seq=seq, path=str(path), reason=str(exc))
                continue
            event = "snapshot_restored" if current is None or seq <= current else "snapshot_uncommitted_used"
            log.info(event, seq=seq, path=str(path), committed_seq=current)
            return snapshot
        log.info("snapshot_none", root=str(self.root))
        return None

    def _load(self, seq: int, path: Path) -> Snapshot:
        manifest = self.verify(path)
        if manifest.get("seq") != seq:
            raise _Corrupt(f"manifest seq {manifest.get('seq')} != directory seq {seq}")
        arrays = {key: np.load(path / name, allow_pickle=False) for key, name in manifest["arrays"].items()}
        return Snapshot(path, seq, arrays, manifest["meta"], manifest["created_at"], sorted(manifest["files"]),
                        manifest.get("state"), manifest.get("refs", {}))

    def verify(self, path: Path) -> dict[str, Any]:
        """The manifest of `path` after checking every file's size and sha256 (raises _Corrupt)."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise _Corrupt("no manifest (incomplete snapshot)") from None
        except ValueError as exc:
            raise _Corrupt(f"unreadable manifest: {exc}") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise _Corrupt(f"unknown format {manifest.get('format')!r}")
        for name, expected in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise _Corrupt(f"missing file {name}")
            if file.stat().st_size != expected["size"]:
                raise _Corrupt(f"size mismatch in {name}: {file.stat().st_size} != {expected['size']}")
            if hash_file(file, fsync=False)["sha256"] != expected["sha256"]:
                raise _Corrupt(f"checksum mismatch in {name}")
        missing = set(manifest["arrays"].values()) - set(manifest["files"])
        if missing:
            raise _Corrupt(f"arrays without checksums: {sorted(missing)}")
        for name, expected in manifest.get("refs", {}).items():
            file = path.parent / name  # refs are relative to the root
            if not file.is_file():
                raise _Corrupt(f"missing referenced file {name}")
            if file.stat().st_size != expected["size"]:
                raise _Corrupt(f"size mismatch in referenced file {name}")
        return manifest


def _json_checked(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"snapshot {what} must be JSON-serialisable: {exc}") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
