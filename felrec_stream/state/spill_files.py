"""Spill files: immutable, content-addressed Parquet files of evicted entities' records.

`SpillFiles` writes each file durably under its sha256 name (`<kind>-<sha256>.parquet`), checks a
file against its name on its first read in a process (`SpillError` on a mismatch), reads only the
row groups holding the records asked for (through caches of open files and decoded row groups),
lists files as snapshot refs and deletes what no snapshot needs. What the records hold and when
they are written: felrec_stream/state/spill.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from felrec_stream.errors import StoreError
from felrec_stream.log import get_logger
from felrec_stream.state.durable import fsync_dir, hash_file, hash_handle

log = get_logger(__name__)

ROW_GROUP = 128  # records per Parquet row group: a restore reads only the groups it needs
OPEN_FILES = 128  # spill files kept open (footer parsed once), least recently used closed first
GROUP_CACHE_BYTES = 64 << 20  # decoded row groups kept (files never change), least recently used dropped
_NAME_RE = re.compile(r"^(user|item)-([0-9a-f]{64})\.parquet$")


class SpillError(StoreError):
    """A spill file is missing or does not match its content address."""


def _missing(path: Path) -> SpillError:
    """A file this process verified is gone: deleted under a running worker (restart it: it restores
    the newest snapshot whose spill files are all there)."""
    return SpillError(f"spill file {path} is missing (deleted while in use?); restart: the newest snapshot "
                      "whose spill files are all there is restored")


class SpillFiles:
    """Immutable, content-addressed Parquet files in one directory (shared by both kinds).

    `directory=None` makes a private temporary directory, removed with this object; dead files are
    then deleted at once. In a given directory (the worker's `<snapshot root>/spill`) files are
    deleted only by `delete_except`, which the owner calls with what its snapshots still need.
    """

    def __init__(self, directory: str | Path | None = None, read_only: bool = False) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="felrec-spill-") if directory is None else None
        self.directory = Path(self._tmp.name) if self._tmp is not None else Path(directory or ".")
        self.private = self._tmp is not None
        self.read_only = read_only
        if not read_only:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                what = "is not a directory" if self.directory.exists() else f"cannot be created: {exc.strerror or exc}"
                raise SpillError(f"spill directory {self.directory} {what}") from None
        self._verified: set[str] = set()
        self._pinned: dict[str, BinaryIO] = {}  # name -> open handle (`pin`): readable after a prune
        self._open: OrderedDict[str, pq.ParquetFile] = OrderedDict()  # least recently used first
        self._groups: OrderedDict[tuple[str, int], dict[str, np.ndarray]] = OrderedDict()  # same order
        self._group_bytes = 0
        # The worker encodes without the query lock while query threads read spilled rows too:
        # the LRU caches above are shared, so reads take this lock.
        self._read_lock = threading.Lock()

    def write(self, kind: str, table: pa.Table) -> str:
        """Durably write `table`; returns its name `<kind>-<sha256>.parquet`."""
        if self.read_only:
            raise SpillError(f"spill directory {self.directory} is read-only here")
        tmp = self.directory / f".{kind}-{uuid.uuid4().hex}.parquet.tmp"
        try:
            pq.write_table(table, tmp, row_group_size=ROW_GROUP, compression="snappy", use_dictionary=False,
                           write_statistics=False)
            digest = hash_file(tmp, fsync=True)["sha256"]
            name = f"{kind}-{digest}.parquet"
            os.replace(tmp, self.directory / name)  # same name = same bytes: replacing an orphan is harmless
            fsync_dir(self.directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise SpillError(f"cannot write a spill file into {self.directory}: {exc.strerror or exc}") from None
        self._verified.add(name)
        return name

    def read(self, name: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Columns (but the id) of records `rows` of file `name` as numpy arrays, in the order given.

        Reads only the row groups holding them, through a cache of decoded row groups: histories
        keep naming the same spilled entities batch after batch, and the files never change.
        """
        groups, where = np.unique(rows // ROW_GROUP, return_inverse=True)
        with self._read_lock:
            self._verify(name)
            parts = self._row_groups(name, [int(g) for g in groups])
        sizes = np.asarray([len(part["slot"]) for part in parts], dtype=np.int64)
        take = np.concatenate([[0], np.cumsum(sizes)[:-1]])[where] + rows % ROW_GROUP
        if len(parts) == 1:
            return {key: value[take] for key, value in parts[0].items()}
        return {key: np.concatenate([part[key] for part in parts])[take] for key in parts[0]}

    def _row_groups(self, name: str, groups: list[int]) -> list[dict[str, np.ndarray]]:
        """Decoded row groups of one file, from the cache or read in one call."""
        found = {g: self._groups[(name, g)] for g in groups if (name, g) in self._groups}
        for g in found:
            self._groups.move_to_end((name, g))
        missing = [g for g in groups if g not in found]
        if missing:
            parquet = self._parquet(name)
            columns = [c for c in parquet.schema_arrow.names if c != "id"]
            table = parquet.read_row_groups(missing, columns=columns)
            start = 0
            for g in missing:
                size = parquet.metadata.row_group(g).num_rows
                part = table.slice(start, size)
                start += size
                found[g] = {c: column_numpy(part.column(c)) for c in columns}
                self._cache_group((name, g), found[g])
        return [found[g] for g in groups]

    def _cache_group(self, key: tuple[str, int], columns: dict[str, np.ndarray]) -> None:
        self._groups[key] = columns
        self._group_bytes += sum(value.nbytes for value in columns.values())
        while self._group_bytes > GROUP_CACHE_BYTES and len(self._groups) > 1:
            _, dropped = self._groups.popitem(last=False)
            self._group_bytes -= sum(value.nbytes for value in dropped.values())

    def pin(self, handles: Mapping[str, BinaryIO]) -> None:
        """Read these files (name -> open binary handle) through their handles from now on: a reader of a
        snapshot keeps reading the files it verified after the writer deleted them (pruning), as a
        reader of a plain snapshot holds its arrays. The handles are closed with this object; their
        content was verified when the snapshot was (SnapshotManager checks every referenced file)."""
        self._pinned.update(handles)
        self._verified.update(handles)

    def close(self) -> None:
        for handle in self._pinned.values():
            handle.close()
        self._pinned.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _verify(self, name: str) -> None:
        """Check a file against its content address once per process (SpillError if it fails)."""
        path = self.directory / name
        if name not in self._verified:
            match = _NAME_RE.match(name)
            pinned = self._pinned.get(name)
            if pinned is None and not path.is_file():
                raise SpillError(f"spill file {path} is missing")
            digest = hash_handle(pinned) if pinned is not None else hash_file(path, fsync=False)["sha256"]
            if match is None or digest != match.group(2):
                raise SpillError(f"spill file {path} does not match its sha256 name (corrupt)")
            self._verified.add(name)

    def _parquet(self, name: str) -> pq.ParquetFile:
        if name in self._open:
            self._open.move_to_end(name)
        else:
            try:
                pinned = self._pinned.get(name)
                self._open[name] = pq.ParquetFile(pinned if pinned is not None else self.directory / name)
            except FileNotFoundError:
                raise _missing(self.directory / name) from None
            if len(self._open) > OPEN_FILES:
                self._open.popitem(last=False)[1].close()
        return self._open[name]

    def refs(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """{name: {"sha256", "size"}} for a snapshot manifest (the hash is the name: no re-read)."""
        out = {}
        for name in sorted(names):
            match = _NAME_RE.match(name)
            if match is None:
                raise SpillError(f"not a spill file name: {name!r}")
            try:
                size = (self.directory / name).stat().st_size
            except FileNotFoundError:
                raise _missing(self.directory / name) from None
            out[name] = {"sha256": match.group(2), "size": size}
        return out

    def delete_except(self, keep: set[str]) -> list[str]:
        """Delete every spill file (and leftover temporary file) not in `keep`; returns the names."""
        if self.read_only or not self.directory.is_dir():
            return []
        doomed = sorted(p.name for p in self.directory.iterdir()
                        if (_NAME_RE.match(p.name) and p.name not in keep) or p.name.endswith(".parquet.tmp"))
        self.delete(doomed)
        return doomed

    def delete(self, names: Iterable[str]) -> None:
        names = list(names)
        for name in names:
            (self.directory / name).unlink(missing_ok=True)
            self._verified.discard(name)
            if name in self._open:
                self._open.pop(name).close()
            for key in [key for key in self._groups if key[0] == name]:
                self._group_bytes -= sum(value.nbytes for value in self._groups.pop(key).values())
        if names:
            log.debug("spill_files_deleted", directory=str(self.directory), files=len(names))


def column_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy; fixed-size lists become 2-D (rows, list size)."""
    array = column.combine_chunks()
    if isinstance(array, pa.FixedSizeListArray):
        return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), array.type.list_size)
    return array.to_numpy(zero_copy_only=False)
