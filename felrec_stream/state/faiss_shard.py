"""One FAISS shard of `ShardedFaissVectors` (felrec_stream/state/faiss_store.py): its storage and ANN side index.

`Shard` holds the truth: an `IndexFlatIP` over unit vectors written in place, each vector's norm,
row -> slot, the external ids and the rows freed by evictions. `HnswAnn` (re-add on update,
tombstones, rebuild from the truth) and `IvfAnn` (trained on the first non-zero rows, exact search
until then) are its optional side indexes; `write_shard` writes a shard's index files. Sharding,
slot bookkeeping and the merged search stay in faiss_store.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from felrec_stream.log import get_logger

log = get_logger(__name__)


class Column:
    """Growing numpy array with capacity doubling: amortised O(1) appends, O(1) views."""

    def __init__(self, dtype: Any, fill: Any, capacity: int = 64) -> None:
        self.fill = fill
        self._data = np.full(capacity, fill, dtype=dtype)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.size + len(values)
        if need > len(self._data):
            grown = np.full(max(need, 2 * len(self._data)), self.fill, dtype=self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size:need] = values
        self.size = need

    @property
    def data(self) -> np.ndarray:
        return self._data[: self.size]

    @property
    def nbytes(self) -> int:
        return self._data.nbytes


def unit_and_norm(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors, norms); zero rows stay zero with norm 0."""
    norms = np.linalg.norm(vectors, axis=1).astype(np.float32)
    safe = np.where(norms > 0, norms, 1.0).astype(np.float32)
    return vectors / safe[:, None], norms


class HnswAnn:
    """HNSW side index of one shard: re-add on update, tombstones, periodic rebuild.

    Node ids are faiss' sequential ids; `node_row` maps them to shard rows (-1 = tombstone) and
    `row_node` maps each row to its live node (-1 = not indexed, e.g. a zero vector).
    """

    kind = "hnsw"

    def __init__(self, dim: int, m: int, ef_search: int, ef_construction: int, rebuild_fraction: float) -> None:
        self.dim, self.m, self.ef_search = dim, m, ef_search
        self.ef_construction, self.rebuild_fraction = ef_construction, rebuild_fraction
        self.row_node = Column(np.int64, -1)
        self._new_index()

    def _new_index(self) -> None:
        self.index = faiss.IndexHNSWFlat(self.dim, self.m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = self.ef_construction
        self.node_row = Column(np.int64, -1)
        self.dead = 0

    def grow(self, n: int) -> None:
        self.row_node.extend(np.full(n, -1, dtype=np.int64))

    def ready(self) -> bool:
        return True

    def update(self, rows: np.ndarray, unit: np.ndarray, norms: np.ndarray, truth: "Shard") -> None:
        old = self.row_node.data[rows]
        had = old >= 0
        self.node_row.data[old[had]] = -1
        self.dead += int(had.sum())
        self.row_node.data[rows] = -1
        live = norms > 0
        self._add(rows[live], unit[live])
        if self.dead > max(64, self.rebuild_fraction * (self.index.ntotal - self.dead)):
            self.rebuild(truth)

    def _add(self, rows: np.ndarray, unit: np.ndarray) -> None:
        if len(rows):
            first = self.index.ntotal
            self.index.add(np.ascontiguousarray(unit, dtype=np.float32))
            self.node_row.extend(rows)
            self.row_node.data[rows] = np.arange(first, first + len(rows))

    def rebuild(self, truth: "Shard") -> None:
        """Fresh graph over the live (non-zero) rows of the flat truth; drops every tombstone."""
        dead = self.dead
        self._new_index()
        self.row_node.data[:] = -1
        rows = np.flatnonzero(truth.norms.data > 0)
        self._add(rows, truth.unit_view()[rows])
        log.info("hnsw_rebuilt", rows=len(rows), tombstones_dropped=dead)

    def reset(self) -> None:
        self._new_index()
        self.row_node.data[:] = -1

    def search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the `fetch` best live nodes (rows -1 where fewer were found)."""
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, fetch)
        bitmap = None
        if self.dead:
            bitmap = np.packbits(self.node_row.data >= 0, bitorder="little")
            params.sel = faiss.IDSelectorBitmap(self.index.ntotal, faiss.swig_ptr(bitmap))
        scores, nodes = self.index.search(queries, fetch, params=params)
        del bitmap  # the selector only borrowed it for the search
        rows = np.where(nodes >= 0, self.node_row.data[np.maximum(nodes, 0)], -1)
        return scores, rows

    def memory_bytes(self) -> int:
        hnsw = self.index.hnsw
        graph = 4 * hnsw.neighbors.size() + 8 * hnsw.offsets.size() + 4 * hnsw.levels.size()
        return 4 * self.dim * self.index.ntotal + graph + self.node_row.nbytes + self.row_node.nbytes

    def write(self, prefix: Path) -> list[Path]:
        index_path, nodes_path = Path(f"{prefix}.hnsw.faiss"), Path(f"{prefix}.hnsw_node_row.npy")
        faiss.write_index(self.index, str(index_path))
        np.save(nodes_path, self.node_row.data, allow_pickle=False)
        return [index_path, nodes_path]


class IvfAnn:
    """IVF-Flat side index of one shard; labels are shard rows; exact search until trained."""

    kind = "ivf"

    def __init__(self, dim: int, nlist: int, nprobe: int, train_size: int) -> None:
        self.dim, self.nlist, self.nprobe, self.train_size = dim, nlist, nprobe, train_size
        self.index: Any = None
        self.present = Column(bool, False)
        self.generation = 0  # +1 whenever the coarse quantizer changes: lists assigned before stay valid until then

    def grow(self, n: int) -> None:
        self.present.extend(np.zeros(n, dtype=bool))

    def ready(self) -> bool:
        return self.index is not None

    def assign(self, unit: np.ndarray) -> np.ndarray:
        """(n,) int64: the inverted list of each unit vector (the costly half of an add). Reads only the
        trained quantizer, so a writer can compute it before it takes the query lock (`lists` below)."""
        _, lists = self._quantizer.search(np.ascontiguousarray(unit, dtype=np.float32), 1)
        return np.ascontiguousarray(lists.reshape(-1), dtype=np.int64)

    def update(self, rows: np.ndarray, unit: np.ndarray, norms: np.ndarray, truth: "Shard",
               lists: np.ndarray | None = None) -> None:
        """`lists`: `assign(unit)` computed ahead by the caller (aligned with `rows`), else computed here.
        What it does is faiss' `update_vectors` (remove, then add) and `add_with_ids`, with the list
        assignment of both done in one call, so both ways give the same lists."""
        if self.index is None:
            if truth.nonzero >= self.train_size:
                self._train(truth)
            return
        present, live = self.present.data[rows], norms > 0
        gone = rows[present & ~live]
        if len(gone):
            self.index.remove_ids(gone)  # hashtable direct map: O(len(gone)) via IDSelectorArray
        if live.any():
            lists = self.assign(unit) if lists is None else lists
            moved = present & live
            if moved.any():
                self.index.remove_ids(np.ascontiguousarray(rows[moved]))
                self._add(rows[moved], unit[moved], lists[moved])
            fresh = ~present & live
            if fresh.any():
                self._add(rows[fresh], unit[fresh], lists[fresh])
        self.present.data[rows] = live

    def _add(self, rows: np.ndarray, unit: np.ndarray, lists: np.ndarray) -> None:
        rows, unit = np.ascontiguousarray(rows, dtype=np.int64), np.ascontiguousarray(unit, dtype=np.float32)
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        self.index.add_core(len(rows), faiss.swig_ptr(unit), faiss.swig_ptr(rows), faiss.swig_ptr(lists))

    def _train(self, truth: "Shard") -> None:
        """Spherical k-means on the first `train_size` non-zero rows, then index every non-zero row."""
        rows = np.flatnonzero(truth.norms.data > 0)
        unit = truth.unit_view()
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True
        index.train(np.ascontiguousarray(unit[rows[: self.train_size]]))
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.add_with_ids(np.ascontiguousarray(unit[rows]), rows.astype(np.int64))
        index.nprobe = self.nprobe
        self._quantizer, self.index = quantizer, index  # the IVF index borrows the quantizer
        self.generation += 1
        self.present.data[:] = False
        self.present.data[rows] = True
        log.info("ivf_trained", nlist=self.nlist, train=min(len(rows), self.train_size), rows=len(rows))

    def reset(self) -> None:
        if self.index is not None:
            self.index.reset()  # keeps the trained centroids, clears lists and direct map
        self.present.data[:] = False

    def search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, fetch)

    def memory_bytes(self) -> int:
        if self.index is None:
            return self.present.nbytes
        n = self.index.ntotal
        # codes + ids in the lists, ~32 B per hashtable entry, centroids.
        return n * (4 * self.dim + 8 + 32) + 4 * self.dim * self.nlist + self.present.nbytes

    def write(self, prefix: Path) -> list[Path]:
        if self.index is None:
            return []
        path = Path(f"{prefix}.ivf.faiss")
        faiss.write_index(self.index, str(path))
        return [path]


class Shard:
    """One shard: flat IP index over unit vectors (the truth), norms, row -> slot, optional ANN."""

    def __init__(self, dim: int, ann: HnswAnn | IvfAnn | None) -> None:
        self.dim = dim
        self.flat = faiss.IndexFlatIP(dim)
        self.norms = Column(np.float32, 0.0)
        self.row_slot = Column(np.int64, -1)
        self.ids: list[str] = []
        self.ann = ann
        self.nonzero = 0
        self.gpu_index: Any = None  # clone of `flat` on the GPU, None when stale or unused
        self.free: list[int] = []  # rows released by evictions (zero vectors, row_slot -1)

    @property
    def size(self) -> int:
        return self.row_slot.size

    def unit_view(self) -> np.ndarray:
        """(rows, D) numpy view of the flat index storage; valid until the next `add_rows`."""
        n = self.flat.ntotal
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return faiss.rev_swig_ptr(self.flat.get_xb(), n * self.dim).reshape(n, self.dim)

    def add_rows(self, slots: np.ndarray, ids: list[str]) -> np.ndarray:
        """Append zero rows for new `slots`; returns their rows."""
        first = self.size
        self.flat.add(np.zeros((len(slots), self.dim), dtype=np.float32))
        self.norms.extend(np.zeros(len(slots), dtype=np.float32))
        self.row_slot.extend(slots)
        self.ids.extend(ids)
        if self.ann is not None:
            self.ann.grow(len(slots))
        self.gpu_index = None
        return np.arange(first, first + len(slots), dtype=np.int64)

    def take_rows(self, slots: np.ndarray, ids: list[str]) -> np.ndarray:
        """Rows for `slots`: freed rows first (they hold zero vectors), then new ones."""
        reused = min(len(self.free), len(slots))
        rows = np.empty(len(slots), dtype=np.int64)
        if reused:
            rows[:reused] = self.free[-reused:][::-1]
            del self.free[-reused:]
            self.row_slot.data[rows[:reused]] = slots[:reused]
            for row, external in zip(rows[:reused].tolist(), ids[:reused]):
                self.ids[row] = external
        if reused < len(slots):
            rows[reused:] = self.add_rows(slots[reused:], ids[reused:])
        return rows

    def release(self, rows: np.ndarray) -> None:
        """Zero `rows` (ANN indexes drop them) and mark them free for `take_rows`."""
        self.write(rows, np.zeros((len(rows), self.dim), dtype=np.float32), np.zeros(len(rows), dtype=np.float32))
        self.row_slot.data[rows] = -1
        for row in rows.tolist():
            self.ids[row] = ""
        self.free.extend(rows.tolist())

    def write(self, rows: np.ndarray, unit: np.ndarray, norms: np.ndarray, lists: np.ndarray | None = None) -> None:
        """Overwrite `rows` in place: O(len(rows)), the index keeps its size. `lists`: the IVF lists of
        `unit` assigned ahead (`IvfAnn.assign`), or None."""
        self.nonzero += int((norms > 0).sum()) - int((self.norms.data[rows] > 0).sum())
        self.unit_view()[rows] = unit
        self.norms.data[rows] = norms
        self.gpu_index = None
        if isinstance(self.ann, IvfAnn):
            self.ann.update(rows, unit, norms, self, lists)
        elif self.ann is not None:
            self.ann.update(rows, unit, norms, self)

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.unit_view()[rows] * self.norms.data[rows, None]

    def reset(self) -> None:
        self.unit_view()[:] = 0.0
        self.norms.data[:] = 0.0
        self.nonzero = 0
        self.gpu_index = None
        if self.ann is not None:
            self.ann.reset()

    def memory_bytes(self) -> int:
        ann = self.ann.memory_bytes() if self.ann is not None else 0
        return 4 * self.dim * self.flat.ntotal + self.norms.nbytes + self.row_slot.nbytes + 8 * len(self.ids) + ann


def write_shard(shard: Shard, base: Path) -> list[Path]:
    paths = [Path(f"{base}.faiss"), Path(f"{base}.row_slot.npy"), Path(f"{base}.norms.npy"), Path(f"{base}.ids.json")]
    faiss.write_index(shard.flat, str(paths[0]))
    np.save(paths[1], shard.row_slot.data, allow_pickle=False)
    np.save(paths[2], shard.norms.data, allow_pickle=False)
    paths[3].write_text(json.dumps(shard.ids))
    if shard.ann is not None:
        paths += shard.ann.write(base)
    return paths
