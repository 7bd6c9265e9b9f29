"""Bounded memory for the representation store: least recently touched entities spill to Parquet.

`cache.max_entities` = N > 0 caps the entities of each kind held in memory (users and items
separately). A `SpillingTable` replaces the `EntityTable` of each kind; the engine, the worker
and the query service keep using the same interface (`slots`, `history.plan/apply/counts`,
`vectors.get/put/rows/search`, `ids.names`, `reset`). The table wraps its vector backend (any
backend with residency: `vectors.TensorRows`, `ShardedFaissVectors`) in a `SpillingVectors` and
its histories in a `PooledHistory`; both get what they need from the table as explicit callables
(read spilled vectors, restore, mark stale), so no backend knows about spilling.

Stable slots, pooled storage
----------------------------
An entity keeps the slot it got on first appearance for ever; eviction frees its *storage*, not
its slot. Slots are never reused because histories store slots of the other kind (a reused slot
would silently redirect every history that names the evicted entity), the query service maps
FAISS results back to ids through slots, and snapshots list ids in slot order. Memory per entity
ever seen is therefore a small floor (id map entry, the per-slot columns `SLOT_COLUMNS`: history
length, count, last-update time, popularity and its event index; residency and spill location:
`benchmarks/bench_spill.py` measures it) while vectors, histories and FAISS rows, the
bulk, exist only for resident entities: the history rows and `TensorRows` vectors live in pools
of rows (slot -> row maps, freed rows reused); `ShardedFaissVectors` frees and reuses shard rows.

Eviction and restore
--------------------
- Touching = an interaction applied to the entity (`history.apply`). After each `apply` (and on
  `enforce_cap()`), when more than N entities of the kind are resident, the least recently touched
  ones (smallest last-update time, ties by slot; never those of the batch just applied) are evicted
  down to 95% of N, so spill files are written in chunks, not per batch.
- Evicting writes one immutable Parquet file per round (kind, chunk): per entity the slot, id,
  exactly what the vector backend holds (`vectors` for `TensorRows`; `unit` + `norms` for FAISS),
  the last-L history, its length, interaction count, last-update time and popularity (`popularity`
  as of event index `popularity_at`; copies of the per-slot columns, which stay in memory and are
  the ones a restore keeps). An entity whose record
  is still current (restored, then only read) is dropped from memory without a write.
- A write path to an evicted slot (`slots(create=True)`, `vectors.put`, `history.plan/apply`)
  restores it first, bit for bit, from its newest record. Reads of vectors (`vectors.get`: the
  engine gathering the cached vectors of history entries, which often name evicted entities) are
  served from the records without restoring, so reading does not churn the resident set. A batch
  may hold more than N entities (its own) until its `apply` evicts again.
- Compaction: each round also rewrites the live records of files that are more than half dead
  (at most as many records as it evicts), so old files empty out and disk use stays proportional
  to the entities, not to the rounds.

Queries
-------
Top-k and similarity searches rank *resident* entities only (the FAISS indexes hold those): with
N sized to the active set, candidates are the recently active items. Point reads (a user's own
vector and history for its recommendations, `/v1/vectors`) are served from the spill without
restoring (`SpillingTable.read`), so every known id answers.

The popularity prior (`HistoryBuffer.popularity`, `cache.popularity_halflife`) is exact for every
item, evicted or not: `pop`/`pop_at` are per-slot columns that never leave memory, and the decay
is computed from `pop_at` when asked, so an evicted item keeps decaying without being touched and
comes back with the popularity an uncapped store would hold. Eviction changes only which items
the searches rank (the resident ones).

Snapshots and crashes
---------------------
Spill files are content-addressed (`<kind>-<sha256>.parquet`, written to a temporary name, fsynced,
renamed), never modified, and live in `<snapshot root>/spill/` when the worker snapshots. A table's
state lists the files it refers to and, per slot, the (file, row) of its record; the snapshot
manifest lists the same files with size and sha256 (`SnapshotManager.write_state(refs=...)`), and
a snapshot whose spill file is missing is skipped like a corrupt one. Dead files are deleted only
by `RepresentationStore.collect_spill(protected)`, with the files every kept snapshot refers to
protected, so pruning never removes a file a snapshot still needs. A crash after a spill write and
before the next snapshot restores the previous snapshot, whose (older) files are intact: the new
file is an orphan and is collected later; nothing is lost or applied twice, because the restored
location map is the only truth about where each entity lives. A store with a private temporary
spill directory (no snapshots) deletes dead files at once. A file's sha256 is checked on its first
read in a process; a mismatch raises `SpillError` (the data cannot be trusted: restore a snapshot).
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
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from felrec_stream.errors import StoreError
from felrec_stream.log import get_logger
from felrec_stream.state.snapshot import fsync_dir, hash_file, hash_handle
from felrec_stream.state.tables import (POPULARITY, SLOT_COLUMNS, EntityRows, EntityTable, HistoryBuffer, HistoryPlan,
                                        IdMap, Kind, check_lengths, check_shapes, slot_column_parts, vector_shapes)
from felrec_stream.state.vectors import VectorBackend, grow, raw_vectors

log = get_logger(__name__)

SPILL_DIR = "spill"  # spill files of a worker live in <snapshot root>/spill/
ROW_GROUP = 128  # records per Parquet row group: a restore reads only the groups it needs
OPEN_FILES = 128  # spill files kept open (footer parsed once), least recently used closed first
GROUP_CACHE_BYTES = 64 << 20  # decoded row groups kept (files never change), least recently used dropped
EVICT_TO = 0.95  # an eviction round frees down to this fraction of the cap
# Record column of each per-slot column (copies: the per-slot columns stay in memory). `popularity`
# is the decayed count as of event index `popularity_at` (HistoryBuffer.popularity).
RECORD_COLUMNS = {"lengths": "history_length", "counts": "interaction_count", "last_time": "last_update_time",
                  "pop": "popularity", "pop_at": "popularity_at"}
_NAME_RE = re.compile(r"^(user|item)-([0-9a-f]{64})\.parquet$")


class SpillError(StoreError):
    """A spill file is missing or does not match its content address."""


def _missing(path: Path) -> SpillError:
    """A file this process verified is gone: deleted under a running worker (restart it: it restores
    the newest snapshot whose spill files are all there)."""
    return SpillError(f"spill file {path} is missing (deleted while in use?); restart: the newest snapshot "
                      "whose spill files are all there is restored")


# ---- files --------------------------------------------------------------------------------------

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
                found[g] = {c: _column_numpy(part.column(c)) for c in columns}
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


# ---- pooled storage -----------------------------------------------------------------------------

class SpillingVectors(VectorBackend):
    """The vectors of a capped table as everyone else sees them: `inner` (any backend with residency:
    `TensorRows`, `ShardedFaissVectors`) holds the resident slots; the evicted ones are read from their
    spill records without restoring them (`read_spilled`), a write restores them first (`restore`) and
    makes their records stale (`wrote`). Searches rank what `inner` holds: the resident slots."""

    def __init__(self, inner: VectorBackend, read_spilled: Callable[[np.ndarray], np.ndarray],
                 restore: Callable[[np.ndarray], None], wrote: Callable[[np.ndarray], None]) -> None:
        self.inner = inner
        self.dim = inner.dim
        self._read_spilled, self._restore, self._wrote = read_spilled, restore, wrote

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def index_type(self) -> str:  # type: ignore[override]  # the inner backend's, read-only
        return self.inner.index_type

    @property
    def writes_index_files(self) -> bool:  # type: ignore[override]
        return self.inner.writes_index_files

    def _spilled(self, flat: np.ndarray) -> np.ndarray:
        """Positions of `flat` naming slots without storage."""
        named = np.flatnonzero(flat >= 0)
        return named[~self.inner.resident(flat[named])]

    def get(self, slots: torch.Tensor) -> torch.Tensor:
        """Resident rows from `inner`; evicted ones straight from their records (not restored)."""
        shape = tuple(torch.as_tensor(slots).shape)
        flat = torch.as_tensor(slots).detach().cpu().reshape(-1).numpy().astype(np.int64, copy=False)
        spilled = self._spilled(flat)
        if not len(spilled):
            return self.inner.get(slots)
        masked = flat.copy()
        masked[spilled] = -1
        out = self.inner.get(torch.from_numpy(masked))
        read = torch.from_numpy(self._read_spilled(flat[spilled]))
        out[torch.from_numpy(spilled).to(out.device)] = read.to(out.device)
        return out.reshape(*shape, self.dim)

    def rows(self, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        spilled = self._spilled(slots)
        if not len(spilled):
            return self.inner.rows(slots)
        out = np.empty((len(slots), self.dim), dtype=np.float32)
        resident = np.ones(len(slots), dtype=bool)
        resident[spilled] = False
        out[resident] = self.inner.rows(slots[resident])
        out[spilled] = self._read_spilled(slots[spilled])
        return out

    def put(self, slots: torch.Tensor, vectors: torch.Tensor) -> None:
        flat = torch.as_tensor(slots).detach().cpu().reshape(-1).numpy().astype(np.int64, copy=False)
        self._restore(flat[flat >= 0])
        self.inner.put(slots, vectors)
        self._wrote(flat)

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Iterable[int]] | None = None, *,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.search(queries, k, exclude, limit=limit)

    def write_index_files(self, directory: str | Path, prefix: str = "") -> list[Path]:
        return self.inner.write_index_files(directory, prefix)

    # the rest is the inner backend's: storage, residency, row states

    def ensure(self, size: int, ids: np.ndarray) -> None:
        self.inner.ensure(size, ids)

    def reset(self) -> None:
        self.inner.reset()

    def all(self) -> torch.Tensor:
        """(size, D) vectors of every slot: evicted ones read as zero here (`SpillingTable.read` has them)."""
        return self.inner.all()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any], ids: np.ndarray) -> None:
        self.inner.load_state_dict(state, ids)

    def rows_state(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        return self.inner.rows_state(slots)

    def load_rows(self, slots: np.ndarray, state: dict[str, np.ndarray]) -> None:
        self.inner.load_rows(slots, state)

    def register(self, size: int, ids: np.ndarray) -> None:
        self.inner.register(size, ids)

    def admit(self, slots: np.ndarray, ids: np.ndarray) -> None:
        self.inner.admit(slots, ids)

    def evict(self, slots: np.ndarray) -> None:
        self.inner.evict(slots)

    def resident(self, slots: np.ndarray) -> np.ndarray:
        return self.inner.resident(slots)


class PooledHistory(HistoryBuffer):
    """`HistoryBuffer` for a capped table: `rows` holds pool rows; the per-slot columns (lengths, counts,
    times, popularity: `SLOT_COLUMNS`) stay in memory for every slot, evicted or not.

    `pool_rows(slots)` restores evicted slots and returns their pool rows; `applied(slots)` is told
    which slots a history update changed (their records are stale, the cap is enforced)."""

    def __init__(self, length: int, pool_rows: Callable[[np.ndarray], np.ndarray],
                 applied: Callable[[np.ndarray], None], halflife: float = 0.0) -> None:
        super().__init__(length, halflife=halflife)
        self._pool_rows, self._applied = pool_rows, applied

    def ensure(self, size: int) -> None:
        """Per-slot columns for `size` slots (rows grow with the pool: `ensure_rows`)."""
        if size > len(self.lengths):
            cap = max(size, 2 * len(self.lengths))
            for key in SLOT_COLUMNS:
                setattr(self, key, grow(getattr(self, key), cap, 0))
        self.size = max(self.size, size)

    def ensure_rows(self, n_rows: int) -> None:
        if n_rows > len(self.rows):
            self.rows = grow(self.rows, max(n_rows, 2 * len(self.rows)), -1)

    def stored_rows(self, slots: np.ndarray) -> np.ndarray:
        pool = self._pool_rows(slots)  # first: a restore may grow `self.rows`
        return self.rows[pool]

    def store_rows(self, slots: np.ndarray, rows: np.ndarray) -> None:
        pool = self._pool_rows(slots)
        self.rows[pool] = rows

    def apply(self, plan: HistoryPlan, last_time: np.ndarray | None = None, slots: np.ndarray | None = None) -> None:
        super().apply(plan, last_time, slots)
        self._applied(plan.unique_slots)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Per-slot columns and the event index only: the rows travel in the table's state (resident)
        and spill files."""
        n = self.size
        return {**{key: getattr(self, key)[:n].copy() for key in SLOT_COLUMNS},
                "events": np.asarray([self.events], dtype=np.int64)}


# ---- the table ----------------------------------------------------------------------------------

class SpillingTable(EntityTable):
    """An `EntityTable` that keeps at most `cap` entities in memory and the rest in spill files."""

    capped = True
    history: PooledHistory

    def __init__(self, kind: Kind, vectors: VectorBackend, history_len: int, cap: int, spill: SpillFiles,
                 popularity_halflife: float = 0.0) -> None:
        if cap < 1:
            raise StoreError(f"max_entities must be >= 1, got {cap}")
        self.kind, self.cap, self.spill = kind, cap, spill
        self.ids = IdMap()
        self.vectors = SpillingVectors(vectors, self.read_vectors, self.need, self.wrote)
        self.history = PooledHistory(history_len, self._pool_rows, self._applied, popularity_halflife)
        self.row_of = np.full(1024, -1, dtype=np.int64)  # slot -> pool row (-1: evicted or never stored)
        self.loc_file = np.full(1024, -1, dtype=np.int32)  # slot -> index in files of its current record
        self.loc_row = np.full(1024, -1, dtype=np.int64)  # slot -> row in that file
        self.slot_of_row = np.full(1024, -1, dtype=np.int64)  # pool row -> slot (-1: free)
        self._rows_used = 0
        self._free: list[int] = []
        self.files: list[str] = []
        self.file_rows: list[int] = []
        self.live = np.zeros(0, dtype=np.int64)  # per file: records that are still the current ones
        self._file_index: dict[str, int] = {}
        self.restored = self.evicted = 0  # since this process started

    @property
    def resident(self) -> int:
        return self._rows_used - len(self._free)

    # -- engine interface --

    def slots(self, ids: np.ndarray, create: bool = True) -> np.ndarray:
        before = len(self.ids)
        slots = self.ids.lookup(ids, create=create)
        if len(self.ids) > before:
            self._register(before, len(self.ids))
        self.need(slots[slots >= 0])
        return slots

    def need(self, slots: np.ndarray) -> None:
        """Restore every evicted slot among `slots` (called before histories are planned or written
        and before vectors are written)."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if len(slots) and (self.row_of[slots] < 0).any():
            missing = np.unique(slots[self.row_of[slots] < 0])
            self._restore(missing)

    def wrote(self, slots: np.ndarray) -> None:
        """`slots` changed in memory: their spill records are no longer current."""
        slots = np.unique(np.asarray(slots, dtype=np.int64))
        where = self.loc_file[slots]
        had = where >= 0
        if had.any():
            np.subtract.at(self.live, where[had], 1)
            self.loc_file[slots], self.loc_row[slots] = -1, -1
            self._drop_dead_files()

    def _pool_rows(self, slots: np.ndarray) -> np.ndarray:
        """Pool rows of `slots`, restoring the evicted ones first."""
        self.need(slots)
        return self.row_of[slots]

    def _applied(self, slots: np.ndarray) -> None:
        self.wrote(slots)
        self.committed(slots)

    def committed(self, slots: np.ndarray) -> None:
        """A history update finished: evict over the cap, sparing the entities just updated."""
        self._evict_over_cap(np.asarray(slots, dtype=np.int64))

    def enforce_cap(self) -> None:
        self._evict_over_cap(np.zeros(0, dtype=np.int64))

    # -- reads without changing residency --

    def read(self, slots: np.ndarray) -> EntityRows:
        """Everything the table holds for `slots`, resident or spilled, without restoring anything."""
        slots = np.asarray(slots, dtype=np.int64)
        n, L = len(slots), self.history.length
        template = self.vectors.rows_state(np.zeros(0, dtype=np.int64))
        vectors = {key: np.zeros((n,) + value.shape[1:], dtype=value.dtype) for key, value in template.items()}
        rows = np.full((n, L), -1, dtype=np.int64)
        resident = np.flatnonzero(self.row_of[slots] >= 0)
        if len(resident):
            for key, value in self.vectors.rows_state(slots[resident]).items():
                vectors[key][resident] = value
            rows[resident] = self.history.rows[self.row_of[slots[resident]]]
        spilled = np.flatnonzero((self.row_of[slots] < 0) & (self.loc_file[slots] >= 0))
        if len(spilled):
            self._read_records(slots[spilled], spilled, vectors, rows)
        h = self.history
        return EntityRows(vectors, rows, *(getattr(h, key)[slots].copy() for key in SLOT_COLUMNS))

    def read_vectors(self, slots: np.ndarray) -> np.ndarray:
        """(n, D) raw vectors of evicted `slots` from their records (through the row-group cache), zeros
        for those without one; nothing is restored (a read must not churn the resident set)."""
        unique, inverse = np.unique(slots, return_inverse=True)
        template = self.vectors.rows_state(np.zeros(0, dtype=np.int64))
        vectors = {key: np.zeros((len(unique),) + value.shape[1:], dtype=value.dtype)
                   for key, value in template.items()}
        located = np.flatnonzero(self.loc_file[unique] >= 0)
        if len(located):
            self._read_records(unique[located], located, vectors, None)
        return raw_vectors(vectors)[inverse]

    def resident_slots(self) -> np.ndarray:
        """Resident slots, ascending."""
        slots = self.slot_of_row[: self._rows_used]
        return np.sort(slots[slots >= 0])

    def spill_names(self) -> set[str]:
        """Files holding at least one current record of this table."""
        return {self.files[f] for f in np.flatnonzero(self.live > 0)}

    # -- residency --

    def _register(self, old: int, size: int) -> None:
        """New slots [old, size): per-slot columns, then zeroed storage (they start resident)."""
        if size > len(self.row_of):
            cap = max(size, 2 * len(self.row_of))
            self.row_of, self.loc_row = grow(self.row_of, cap, -1), grow(self.loc_row, cap, -1)
            self.loc_file = grow(self.loc_file, cap, -1)
        new = np.arange(old, size, dtype=np.int64)
        ids = np.asarray(self.ids.names(new), dtype=object)
        self.history.ensure(size)
        self.vectors.register(size, ids)
        self._take_rows(new)
        self.vectors.admit(new, ids)

    def _take_rows(self, slots: np.ndarray) -> np.ndarray:
        """Pool rows for `slots` (freed rows first, most recently freed first), history rows cleared."""
        reused = min(len(self._free), len(slots))
        rows = np.empty(len(slots), dtype=np.int64)
        if reused:
            rows[:reused] = self._free[-reused:][::-1]
            del self._free[-reused:]
        rows[reused:] = np.arange(self._rows_used, self._rows_used + len(slots) - reused)
        self._rows_used += len(slots) - reused
        if self._rows_used > len(self.slot_of_row):
            self.slot_of_row = grow(self.slot_of_row, max(self._rows_used, 2 * len(self.slot_of_row)), -1)
        self.history.ensure_rows(self._rows_used)
        self.history.rows[rows] = -1
        self.slot_of_row[rows], self.row_of[slots] = slots, rows
        return rows

    def _restore(self, slots: np.ndarray) -> None:
        data = self.read(slots)
        ids = np.asarray(self.ids.names(slots), dtype=object)
        rows = self._take_rows(slots)
        self.history.rows[rows] = data.rows
        self.vectors.admit(slots, ids)
        self.vectors.load_rows(slots, data.vectors)
        self.restored += len(slots)

    def _evict_over_cap(self, protect: np.ndarray) -> None:
        if self.spill.read_only or self.resident <= self.cap:
            return
        candidates = self.resident_slots()
        candidates = candidates[~np.isin(candidates, protect)]
        n = min(self.resident - int(self.cap * EVICT_TO), len(candidates))
        if n > 0:
            self.evict(self._least_recent(candidates, n))

    def _least_recent(self, candidates: np.ndarray, n: int) -> np.ndarray:
        """The `n` candidates with the oldest last-update time, ties by slot (deterministic, O(len))."""
        if n >= len(candidates):
            return candidates
        times = self.history.last_time[candidates]
        kth = np.partition(times, n - 1)[n - 1]
        below = candidates[times < kth]
        tied = np.sort(candidates[times == kth])[: n - len(below)]
        return np.concatenate([below, tied])

    def evict(self, slots: np.ndarray) -> None:
        """Move resident `slots` to the spill (a write only for those whose record is stale)."""
        slots = np.unique(np.asarray(slots, dtype=np.int64))
        if (self.row_of[slots] < 0).any():
            missing = slots[self.row_of[slots] < 0][:5].tolist()
            raise StoreError(f"evict: {self.kind.value} slots {missing} are not resident")
        stale = slots[self.loc_file[slots] < 0]
        if len(stale):
            self._write_records(stale)
        self.vectors.evict(slots)
        rows = self.row_of[slots]
        self.slot_of_row[rows], self.row_of[slots] = -1, -1
        self._free.extend(rows.tolist())
        self.evicted += len(slots)
        log.debug("entities_evicted", kind=self.kind.value, evicted=len(slots), written=len(stale),
                  resident=self.resident, spill_files=int((self.live > 0).sum()))

    # -- spill records --

    def _write_records(self, stale: np.ndarray) -> None:
        """One file with the stale records plus live records moved out of mostly dead files."""
        moved = self._compaction(budget=len(stale))
        slots = np.concatenate([stale, moved])
        data = self.read(slots)
        name = self.spill.write(self.kind.value, self._records(slots, data))
        f = self._file_index.get(name)
        if f is None:  # identical bytes = identical records: an existing index stays valid
            f = self._file_index[name] = len(self.files)
            self.files.append(name)
            self.file_rows.append(len(slots))
            self.live = np.append(self.live, 0)
        old = self.loc_file[moved]
        np.subtract.at(self.live, old, 1)
        self.loc_file[slots], self.loc_row[slots] = f, np.arange(len(slots))
        self.live[f] += len(slots)
        self._drop_dead_files()

    def _compaction(self, budget: int) -> np.ndarray:
        """Slots whose current records sit in files more than half dead: the sparsest file, then
        more (sparsest first) while their records fit in `budget`."""
        sizes = np.asarray(self.file_rows, dtype=np.int64)
        sparse = np.flatnonzero((self.live > 0) & (2 * self.live < sizes))
        if not len(sparse) or budget < 1:
            return np.zeros(0, dtype=np.int64)
        chosen: list[int] = []
        total = 0
        for f in sparse[np.argsort(self.live[sparse], kind="stable")]:
            if chosen and total + self.live[f] > budget:  # the sparsest file always goes
                break
            chosen.append(f)
            total += int(self.live[f])
        n = len(self.ids)
        return np.flatnonzero(np.isin(self.loc_file[:n], chosen)).astype(np.int64)

    def _records(self, slots: np.ndarray, data: EntityRows) -> pa.Table:
        columns = {"slot": pa.array(slots), "id": pa.array(self.ids.names(slots), type=pa.string())}
        for key, value in data.vectors.items():
            columns[key] = _fixed_list(value) if value.ndim == 2 else pa.array(value)
        columns["history"] = _fixed_list(data.rows)
        for key in SLOT_COLUMNS:  # KeyError here = a per-slot column without a record name
            columns[RECORD_COLUMNS[key]] = pa.array(getattr(data, key))
        return pa.table(columns)

    def _read_records(self, slots: np.ndarray, positions: np.ndarray, vectors: dict[str, np.ndarray],
                      rows: np.ndarray | None) -> None:
        """Fill `vectors[key][positions]` and `rows[positions]` (unless None) from the records of `slots`."""
        files = self.loc_file[slots]
        for f in np.unique(files):
            mine = np.flatnonzero(files == f)
            records = self.spill.read(self.files[f], self.loc_row[slots[mine]])
            if not np.array_equal(records["slot"], slots[mine]):
                raise SpillError(f"spill file {self.files[f]} holds other slots than its index says")
            for key in vectors:
                vectors[key][positions[mine]] = records[key]
            if rows is not None:
                rows[positions[mine]] = records["history"]

    def _drop_dead_files(self) -> None:
        """In a private directory, delete files without current records at once."""
        if not self.spill.private:
            return
        # an index whose name was written again later (same bytes, e.g. after reset) is not the file's owner
        dead = [self.files[f] for f in np.flatnonzero(self.live == 0) if self._file_index.get(self.files[f]) == f]
        for name in dead:
            del self._file_index[name]  # the index stays (no slot points there any more)
        self.spill.delete(dead)

    # -- lifecycle --

    def reset(self) -> None:
        """Zero every vector and history (epoch restarts); slots are kept, every record becomes stale."""
        self.vectors.reset()
        self.history.reset()
        self.loc_file[:], self.loc_row[:] = -1, -1
        self.live[:] = 0
        self._drop_dead_files()

    def state_dict(self) -> dict[str, Any]:
        """Ids, per-slot columns, resident entities, and where every spilled record lives."""
        n = len(self)
        resident = self.resident_slots()
        used = np.flatnonzero(self.live > 0)
        remap = np.full(len(self.files) + 1, -1, dtype=np.int32)  # index -1 -> -1
        remap[used] = np.arange(len(used))
        return {
            "ids": self.ids.ids(),
            "history": self.history.state_dict(),
            "resident": {"slots": resident, "rows": self.history.rows[self.row_of[resident]],
                         "vectors": self.vectors.rows_state(resident)},
            "spill": {"files": [self.files[f] for f in used],
                      "file_rows": np.asarray(self.file_rows, dtype=np.int64)[used],
                      "file": remap[self.loc_file[:n]], "row": self.loc_row[:n].copy()},
        }

    def check_state(self, state: dict[str, Any], dim: int) -> None:
        """Shapes and indexes of a capped state (an uncapped one is checked by `EntityTable`)."""
        if "spill" not in state:
            super().check_state(state, dim)
            return
        n, length = len(state["ids"]), self.history.length
        resident, spill, history = state["resident"], state["spill"], state["history"]
        slots = np.asarray(resident["slots"])
        r, files = len(slots), len(spill["files"])
        parts = slot_column_parts(history, n)
        parts += [("resident.rows", resident["rows"], (r, length)), ("spill.file", spill["file"], (n,)),
                  ("spill.row", spill["row"], (n,)), ("spill.file_rows", spill["file_rows"], (files,))]
        parts += [(f"resident.vectors.{key}", resident["vectors"][key], shape)
                  for key, shape in vector_shapes(resident["vectors"], r, dim).items()]
        check_shapes(self.kind, parts,
                     f"{n} ids, {r} resident, {files} spill files, dim {dim}, history length {length}")
        check_lengths(self.kind, history["lengths"], length)
        located = np.asarray(spill["file"])
        if r and (slots.min() < 0 or slots.max() >= n or len(np.unique(slots)) != r):
            raise StoreError(f"{self.kind.value} resident slots are not distinct slots in [0, {n})")
        if n and (located.min() < -1 or located.max() >= files):
            raise StoreError(f"{self.kind.value} spill locations name files outside [0, {files})")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A capped state (above), or an uncapped one (every entity loaded, then evicted to the cap)."""
        if len(self.ids):
            raise StoreError("load_state_dict needs an empty table")
        ids = list(state["ids"])
        history = state["history"]
        if "rows" in history and np.asarray(history["rows"]).shape[1:] != (self.history.length,):
            raise StoreError(f"history length mismatch: snapshot has {np.asarray(history['rows']).shape[1:]}, "
                             f"store {self.history.length}")
        self.ids = IdMap(ids)
        n = len(ids)
        self._register_loaded(n)
        for key in SLOT_COLUMNS:
            if key in history:  # popularity: absent from states written before it existed
                getattr(self.history, key)[:n] = history[key]
        if POPULARITY[0] in history:
            self.history.events = int(np.asarray(history["events"]).reshape(-1)[0])
        if "spill" in state:
            self._load_spill(state["spill"], n)
            resident = np.asarray(state["resident"]["slots"], dtype=np.int64)
            self._load_resident(resident, np.asarray(state["resident"]["rows"]), state["resident"]["vectors"])
        else:
            all_slots = np.arange(n, dtype=np.int64)
            self._load_resident(all_slots, np.asarray(history["rows"]), state["vectors"])
            self.enforce_cap()

    def _register_loaded(self, n: int) -> None:
        self.row_of, self.loc_row = np.full(max(n, 1), -1, np.int64), np.full(max(n, 1), -1, np.int64)
        self.loc_file = np.full(max(n, 1), -1, np.int32)
        self.history.ensure(n)
        self.vectors.register(n, np.asarray(self.ids.ids(), dtype=object))

    def _load_spill(self, spill: dict[str, Any], n: int) -> None:
        self.files = list(spill["files"])
        self.file_rows = [int(x) for x in np.asarray(spill["file_rows"]).reshape(-1)]
        self._file_index = {name: f for f, name in enumerate(self.files)}
        self.loc_file[:n], self.loc_row[:n] = spill["file"], spill["row"]
        located = self.loc_file[:n]
        self.live = np.bincount(located[located >= 0], minlength=len(self.files)).astype(np.int64)

    def _load_resident(self, slots: np.ndarray, rows: np.ndarray, vectors: dict[str, np.ndarray]) -> None:
        pool = self._take_rows(slots)
        self.history.rows[pool] = rows
        self.vectors.admit(slots, np.asarray(self.ids.names(slots), dtype=object))
        self.vectors.load_rows(slots, vectors)


def _fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _column_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy; fixed-size lists become 2-D (rows, list size)."""
    array = column.combine_chunks()
    if isinstance(array, pa.FixedSizeListArray):
        return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), array.type.list_size)
    return array.to_numpy(zero_copy_only=False)
