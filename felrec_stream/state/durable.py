"""Durable files: writes that are fsynced and hashed once, atomic JSON replacement, directory fsync.

Used by snapshots (felrec_stream/state/snapshot.py), spill files and published versions: a file
written through `write_durable` is on disk with its sha256 and size known; `atomic_json` readers
see the old or the new content, never half of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

_CHUNK = 1 << 20


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


def write_durable(path: Path, payload: Callable[[Any], None]) -> dict[str, Any]:
    """Write through `payload(file)`, flush + fsync; returns {"sha256", "size"}."""
    with open(path, "wb") as handle:
        sink = _HashingFile(handle)
        payload(sink)
        handle.flush()
        os.fsync(handle.fileno())
    return {"sha256": sink.sha.hexdigest(), "size": sink.size}


def hash_handle(handle: BinaryIO) -> str:
    """sha256 of an open binary file's whole content (read from its start)."""
    sha = hashlib.sha256()
    handle.seek(0)
    while chunk := handle.read(_CHUNK):
        sha.update(chunk)
    return sha.hexdigest()


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


def atomic_json(path: Path, value: Any) -> None:
    """tmp + fsync + os.replace: readers see the old or the new content, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(value, indent=1, sort_keys=True).encode("utf-8")
    write_durable(tmp, lambda f: f.write(text))
    os.replace(tmp, path)
