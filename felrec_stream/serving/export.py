"""Export the representation store for offline jobs that must not depend on this package.

Output directory (documented for consumers in docker/README.md, "Export layout"):

    users.parquet, items.parquet   one row per entity, row number = slot
        id                string
        vector            fixed_size_list<float32>[dim]  raw encoder output (not normalised)
        last_update_time  int64   event time of the entity's latest interaction (dataset unit)
        interaction_count int64   interactions seen since the store started
        history_length    int64   entries in its last-L history (<= history_len)
    faiss/users/, faiss/items/     ShardedFaissVectors.write_index_files output per kind:
        shard-NNNN.faiss           IndexFlatIP over *unit* vectors (inner product = cosine)
        shard-NNNN.row_slot.npy    faiss row -> slot (= parquet row); -1 = free row (zero vector)
        shard-NNNN.norms.npy       row -> norm (raw vector = unit * norm)
        shard-NNNN.ids.json        row -> external id
        shard-NNNN.hnsw.faiss (+ .hnsw_node_row.npy) / .ivf.faiss   optional ANN side index
        index.json                 dim, shards, index_type, sizes
    layout.json                    written last: its presence means the export is complete

Plain pyarrow + faiss read all of it (tests/felrec_stream/serving/test_export.py does exactly that).

With a capped store (cache.max_entities) the Parquet tables still hold every entity (spilled ones
are read from their files, `EXPORT_CHUNK` slots at a time, so the export never holds the whole
store in memory) while the FAISS files index the entities held in memory, as the query service does.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from felrec_stream.config import CacheConfig, to_dict
from felrec_stream.errors import ServiceError, StoreError
from felrec_stream.log import get_logger
from felrec_stream.serving.snapshots import load_store_from_snapshot
from felrec_stream.state.faiss_store import ShardedFaissVectors
from felrec_stream.state.meta import SnapshotMeta
from felrec_stream.state.snapshot import LOAD_ERRORS, SnapshotManager
from felrec_stream.state.store import EntityTable, Kind, RepresentationStore, VectorBackend

log = get_logger(__name__)

FORMAT = "felrec-export/1"
LAYOUT = "layout.json"
_TABLE_NAMES = {Kind.USER: "users", Kind.ITEM: "items"}


EXPORT_CHUNK = 65_536  # slots read and written per Parquet row group


def _schema(table: EntityTable, dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("last_update_time", pa.int64(), nullable=False),
        pa.field("interaction_count", pa.int64(), nullable=False),
        pa.field("history_length", pa.int64(), nullable=False),
    ], metadata={"kind": table.kind.value, "dim": str(dim), "format": FORMAT})


def entity_batches(table: EntityTable, dim: int) -> Iterator[pa.RecordBatch]:
    """One kind as Arrow record batches in slot order (row number = slot)."""
    schema = _schema(table, dim)
    for start in range(0, len(table), EXPORT_CHUNK):
        slots = np.arange(start, min(start + EXPORT_CHUNK, len(table)), dtype=np.int64)
        data = table.read(slots)
        flat = pa.array(np.ascontiguousarray(data.raw(), dtype=np.float32).reshape(-1), type=pa.float32())
        yield pa.record_batch([
            pa.array(table.ids.names(slots), type=pa.string()), pa.FixedSizeListArray.from_arrays(flat, dim),
            pa.array(data.last_time), pa.array(data.counts), pa.array(data.lengths),
        ], schema=schema)


def _write_entities(table: EntityTable, dim: int, path: Path) -> None:
    with pq.ParquetWriter(path, _schema(table, dim)) as writer:
        for batch in entity_batches(table, dim):
            writer.write_batch(batch)


def _faiss_backend(table: EntityTable, dim: int, cache: CacheConfig) -> VectorBackend:
    """The table's FAISS backend, or one built from its resident vectors (e.g. a TensorVectors store)."""
    if table.vectors.writes_index_files:
        return table.vectors
    backend = ShardedFaissVectors.from_config(dim, cache)
    backend.register(len(table), np.asarray(table.ids.ids(), dtype=object))
    resident = table.resident_slots()
    backend.admit(resident, table.ids.names(resident))
    backend.load_rows(resident, {"vectors": table.read(resident).raw()})
    return backend


def export_store(store: RepresentationStore, out_dir: str | Path, cache: CacheConfig | None = None,
                 source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write parquet tables, FAISS files and layout.json (last) under `out_dir`; returns the layout.

    The caller must keep writers out while this runs (hold the worker's lock, or export a snapshot).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / LAYOUT).unlink(missing_ok=True)  # an interrupted re-export must not look complete
    cache = cache or CacheConfig(history_len=store.history_len)
    layout: dict[str, Any] = {"format": FORMAT, "created_at": datetime.now(timezone.utc).isoformat(),
                              "dim": store.dim, "history_len": store.history_len, "cache": to_dict(cache),
                              "source": dict(source or {}), "tables": {}, "faiss": {}}
    for kind, name in _TABLE_NAMES.items():
        table = store.tables[kind]
        _write_entities(table, store.dim, out / f"{name}.parquet")
        faiss_dir = out / "faiss" / name
        written = _faiss_backend(table, store.dim, cache).write_index_files(faiss_dir)
        layout["tables"][name] = {"path": f"{name}.parquet", "rows": len(table)}
        layout["faiss"][name] = {"dir": f"faiss/{name}", "index": f"faiss/{name}/index.json",
                                 "files": sorted(p.relative_to(out).as_posix() for p in written)}
    (out / LAYOUT).write_text(json.dumps(layout, indent=1))
    log.info("export_written", out=str(out), users=len(store.users), items=len(store.items))
    return layout


def export_snapshot(snapshot_dir: str | Path, out_dir: str | Path,
                    cache_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Export the newest snapshot under `snapshot_dir` that verifies and loads (see
    serving.snapshots.load_store_from_snapshot); one that does not load is skipped for the previous one, and
    one the worker prunes while it is read is replaced by the newer one."""
    manager = SnapshotManager(snapshot_dir, pin_refs=True)  # reads the spill files it verified, even once pruned
    found = manager.load_newest(lambda snap: load_store_from_snapshot(snap, cache_overrides),
                                skip=LOAD_ERRORS + (StoreError, ServiceError))
    if found is None:
        raise ServiceError(f"no valid snapshot under {snapshot_dir}")
    snapshot, store = found
    overrides = {**dict(cache_overrides or {}), "history_len": store.history_len}
    cache = SnapshotMeta.from_dict(snapshot.meta).cache_config(overrides)
    source = {"snapshot_dir": str(snapshot_dir), "snapshot_seq": snapshot.seq,
              "snapshot_created_at": snapshot.created_at}
    return export_store(store, out_dir, cache, source)
