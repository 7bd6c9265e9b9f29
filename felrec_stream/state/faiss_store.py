"""Sharded FAISS vector backend for the representation cache (the streaming worker's store).

FELRec overwrites an entity's representation on every interaction, so the cache is write-heavy:
every micro-batch rewrites up to B rows. `ShardedFaissVectors` keeps one kind's vectors in N FAISS
shards chosen by a *stable* hash of the external id (crc32 of UTF-8, never Python's salted
`hash()`, so a restart or another process puts an id in the same shard):

- each shard's truth is an `IndexFlatIP` over L2-normalised vectors (inner product = cosine) with
  each vector's norm kept beside it, so `get()` returns the raw encoder output (unit * norm);
- updates write the flat index storage in place (a numpy view over `get_xb()`), O(batch), never
  `remove_ids` + `add` (which rebuilds the whole index, 60-100 ms at 1M rows);
- optional ANN side indexes per shard: "hnsw" (faiss cannot remove from HNSW: an update re-adds
  the vector as a new node and tombstones the old one, filtered out with an `IDSelectorBitmap`;
  the graph is rebuilt from the flat truth past `hnsw_rebuild_fraction` tombstones; overwriting
  graph nodes in place was measured at recall@10 ~0.05 after drift, so it is not used) and "ivf"
  (`IndexIVFFlat` with a hashtable direct map and `update_vectors`; trained on the first K
  non-zero vectors of the shard, exact search until then);
- on a faiss build with GPUs and a CUDA device, flat shards are cloned to the GPU for search
  (re-cloned lazily after writes); CPU-only builds never touch that path.

Zero vectors (never-written slots, empty histories) stay zero: exact search scores them 0, ANN
indexes leave them out (they have no direction). Not thread-safe for writers; a lock serialises
writes against concurrent searches from a query thread.

Under a cap (`cache.max_entities`, felrec_stream/state/spill.py) slots can be registered without
storage and evicted: an evicted slot's shard row is zeroed (ANN indexes drop it), marked free
(row -> slot -1, never returned by a search) and reused by the next slot admitted to that shard,
so each shard holds at most the resident entities plus the rows freed since the last admissions.

One shard's storage and its ANN side indexes live in felrec_stream/state/faiss_shard.py.
"""

from __future__ import annotations

import json
import threading
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import faiss
import numpy as np
import torch

from felrec_stream.config import CacheConfig
from felrec_stream.errors import StoreError
from felrec_stream.log import get_logger
from felrec_stream.state.faiss_shard import Column, HnswAnn, IvfAnn, Shard, unit_and_norm, write_shard
from felrec_stream.state.store import RepresentationStore
from felrec_stream.state.tables import last_occurrence
from felrec_stream.state.vectors import StagedPut, VectorBackend, raw_vectors, slot_array

log = get_logger(__name__)

_NO_SLOT = np.iinfo(np.int64).max  # sorts after every real slot in the merge


def shard_of(ids: Iterable[Any], shards: int) -> np.ndarray:
    """Stable shard (int32) of each external id: crc32(UTF-8 id) mod `shards`."""
    return np.fromiter((zlib.crc32(str(i).encode("utf-8")) % shards for i in ids), dtype=np.int32)


def faiss_gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


class ShardedFaissVectors(VectorBackend):
    """One kind's vectors in `shards` FAISS shards; a drop-in `VectorBackend` with cosine search.

    Global slot -> (shard, row) lives in numpy arrays; rows of a shard are appended in slot order,
    so within a shard row order is slot order (used for deterministic tie-breaking).
    """

    writes_index_files = True

    def __init__(self, dim: int, shards: int = 1, index_type: str = "flat", device: torch.device | str = "cpu", *,
                 hnsw_m: int = 32, hnsw_ef_search: int = 64, hnsw_ef_construction: int = 40,
                 hnsw_rebuild_fraction: float = 0.2, ivf_nlist: int = 1024, ivf_nprobe: int = 16,
                 ivf_train_size: int | None = None, use_gpu: bool | None = None) -> None:
        if index_type not in ("flat", "hnsw", "ivf"):
            raise StoreError(f"unknown index_type {index_type!r}; expected flat, hnsw or ivf")
        if shards < 1 or dim < 1:
            raise StoreError(f"need dim >= 1 and shards >= 1, got dim={dim} shards={shards}")
        self.dim, self.index_type = dim, index_type
        self._device = torch.device(device)
        nlist = max(1, ivf_nlist // shards)  # ivf_nlist is the total over all shards

        def ann() -> HnswAnn | IvfAnn | None:
            if index_type == "hnsw":
                return HnswAnn(dim, hnsw_m, hnsw_ef_search, hnsw_ef_construction, hnsw_rebuild_fraction)
            if index_type == "ivf":
                return IvfAnn(dim, nlist, ivf_nprobe, ivf_train_size or 39 * nlist)
            return None

        self.shards = [Shard(dim, ann()) for _ in range(shards)]
        self._slot_shard = Column(np.int32, -1)
        self._slot_row = Column(np.int64, -1)
        self._lock = threading.RLock()
        self._gpu = self._init_gpu(use_gpu)

    @classmethod
    def from_config(cls, dim: int, cache: CacheConfig, device: torch.device | str = "cpu",
                    **options: Any) -> "ShardedFaissVectors":
        settings = {"hnsw_m": cache.hnsw_m, "hnsw_ef_search": cache.hnsw_ef_search, "ivf_nlist": cache.ivf_nlist,
                    "ivf_nprobe": cache.ivf_nprobe}
        return cls(dim, cache.shards, cache.index_type, device, **{**settings, **options})

    def _init_gpu(self, use_gpu: bool | None) -> Any:
        """GPU resources when wanted (default: device is cuda) and possible; None otherwise."""
        wanted = self._device.type == "cuda" if use_gpu is None else use_gpu
        if not wanted or self.index_type != "flat":
            return None
        if not (faiss_gpu_available() and torch.cuda.is_available()):
            log.warning("faiss_gpu_unavailable", device=str(self._device), index_type=self.index_type)
            return None
        return faiss.StandardGpuResources()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def size(self) -> int:
        return self._slot_row.size

    # No __len__ on purpose: RepresentationStore picks backends with `user_vectors or TensorVectors(...)`,
    # so an empty backend that is falsy would be silently replaced.

    # ---- VectorBackend -------------------------------------------------------------------------

    def ensure(self, size: int, ids: np.ndarray | Sequence[str]) -> None:
        """New slots [self.size, size) get their shard from their id; they read as zero until put."""
        with self._lock:
            old = self.size
            new_ids = self._register(size, ids)
            if new_ids:
                self.admit(np.arange(old, size, dtype=np.int64), new_ids)

    def register(self, size: int, ids: np.ndarray | Sequence[str]) -> None:
        """Slots [self.size, size) get their shard from their id, but no row yet (see `admit`).

        `ids` are the new slots' ids, or every id (e.g. load_state_dict on an empty table).
        """
        self._register(size, ids)

    def _register(self, size: int, ids: np.ndarray | Sequence[str]) -> list[str]:
        """`register`; returns the new slots' ids."""
        with self._lock:
            old = self.size
            if size <= old:
                return []
            ids = list(ids)
            if len(ids) == size:
                ids = ids[old:]
            if len(ids) != size - old:
                raise StoreError(f"ensure({size}) on {old} slots needs {size - old} new ids, got {len(ids)}")
            self._slot_shard.extend(shard_of(ids, len(self.shards)))
            self._slot_row.extend(np.full(len(ids), -1, dtype=np.int64))
            return ids

    def admit(self, slots: np.ndarray, ids: np.ndarray | Sequence[str]) -> None:
        """Zero rows in their shards for registered `slots` that have none (`ids`: theirs, same order)."""
        with self._lock:
            slots = np.asarray(slots, dtype=np.int64)
            if len(slots) and (self._slot_row.data[slots] >= 0).any():
                raise StoreError("admit: some slots already have rows")
            shard_ids = self._slot_shard.data[slots]
            for s in np.unique(shard_ids):
                mine = np.flatnonzero(shard_ids == s)
                self._slot_row.data[slots[mine]] = self.shards[s].take_rows(slots[mine], [ids[int(i)] for i in mine])

    def evict(self, slots: np.ndarray) -> None:
        """Free the rows of `slots` (they read as missing until admitted again)."""
        with self._lock:
            slots = np.asarray(slots, dtype=np.int64)
            self._check_slots(slots)
            shard_ids, rows = self._slot_shard.data[slots], self._slot_row.data[slots]
            for s in np.unique(shard_ids):
                self.shards[s].release(rows[shard_ids == s])
            self._slot_row.data[slots] = -1

    def resident(self, slots: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._slot_row.data[np.asarray(slots, dtype=np.int64)] >= 0

    def get(self, slots: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """(..., D) raw vectors (unit * norm) of `slots` (-1 -> zero) on `device` or `self.device`.

        Evicted slots raise (a capped table reads them from their spill records: spill.SpillingVectors)."""
        flat = np.asarray(torch.as_tensor(slots).detach().cpu().reshape(-1).numpy(), dtype=np.int64)
        out = np.zeros((len(flat), self.dim), dtype=np.float32)
        with self._lock:
            where = np.flatnonzero(flat >= 0)
            present = self._check_slots(flat[where])
            shard_ids, rows = self._slot_shard.data[present], self._slot_row.data[present]
            for s in np.unique(shard_ids):
                mine = shard_ids == s
                out[where[mine]] = self.shards[s].read(rows[mine])
        result = torch.from_numpy(out).reshape(*tuple(torch.as_tensor(slots).shape), self.dim)
        return result.to(device or self._device)

    def rows(self, slots: np.ndarray) -> np.ndarray:
        """(n, D) float32 raw vectors of `slots` (all >= 0) as numpy: `get` without torch (query path)."""
        slots = np.asarray(slots, dtype=np.int64)
        out = np.empty((len(slots), self.dim), dtype=np.float32)
        with self._lock:
            self._check_slots(slots)
            shard_ids, rows = self._slot_shard.data[slots], self._slot_row.data[slots]
            if len(self.shards) == 1:
                return self.shards[0].read(rows)
            for s in np.unique(shard_ids):
                mine = shard_ids == s
                out[mine] = self.shards[s].read(rows[mine])
        return out

    def put(self, slots: torch.Tensor, vectors: torch.Tensor) -> None:
        """Overwrite rows in place (O(batch) per shard); the indexes keep their size."""
        self._write_unit(*self._unit_rows(slots, vectors))

    def stage(self, slots: torch.Tensor, vectors: torch.Tensor) -> StagedPut:
        """Unit vectors, norms and each IVF shard's list assignment, computed ahead (module docstring)."""
        flat, unit, norms = self._unit_rows(slots, vectors)
        if len(flat) and flat.max() >= self.size:
            return StagedPut(slots, vectors)  # `put` raises the error
        shard_ids = self._slot_shard.data[flat].copy()
        lists = np.full(len(flat), -1, dtype=np.int64)
        generations: dict[int, int] = {}
        for s in np.unique(shard_ids).tolist():
            ann = self.shards[s].ann
            if isinstance(ann, IvfAnn) and ann.ready():
                mine = shard_ids == s
                lists[mine], generations[s] = ann.assign(unit[mine]), ann.generation
        return StagedPut(slots, vectors, _FaissPlan(flat, unit, norms, shard_ids, lists, generations))

    def put_staged(self, staged: StagedPut) -> None:
        plan = staged.plan
        if isinstance(plan, _FaissPlan):
            self._write_unit(plan.flat, plan.unit, plan.norms, plan)
        else:
            self.put(staged.slots, staged.vectors)

    def _unit_rows(self, slots: torch.Tensor, vectors: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        flat = np.asarray(torch.as_tensor(slots).detach().cpu().reshape(-1).numpy(), dtype=np.int64)
        values = torch.as_tensor(vectors).detach().to("cpu", torch.float32).numpy().reshape(len(flat), -1)
        if values.shape[1] != self.dim:
            raise StoreError(f"put: vectors have dim {values.shape[1]}, store has {self.dim}")
        if len(flat) and (flat < 0).any():
            raise StoreError("put: slots must be >= 0")
        if len(np.unique(flat)) != len(flat):  # keep the latest write per slot, like the in-batch rule
            flat, last = last_occurrence(flat)
            values = values[last]
        return (flat, *unit_and_norm(values))

    def _write_unit(self, slots: np.ndarray, unit: np.ndarray, norms: np.ndarray,
                    plan: "_FaissPlan | None" = None) -> None:
        with self._lock:
            self._check_slots(slots)
            shard_ids, rows = self._slot_shard.data[slots], self._slot_row.data[slots]
            for s in np.unique(shard_ids):
                mine = shard_ids == s
                shard = self.shards[s]
                lists = None if plan is None else plan.lists_for(int(s), mine, shard)
                shard.write(rows[mine], unit[mine], norms[mine], lists)

    def reset(self) -> None:
        with self._lock:
            for shard in self.shards:
                shard.reset()

    def all(self) -> torch.Tensor:
        """(size, D) raw vectors in slot order, on CPU (cheap path for state_dict)."""
        with self._lock:
            out = np.zeros((self.size, self.dim), dtype=np.float32)
            for shard in self.shards:
                used = shard.row_slot.data >= 0  # free rows (evictions) belong to no slot
                if shard.size:
                    out[shard.row_slot.data[used]] = (shard.unit_view() * shard.norms.data[:, None])[used]
        return torch.from_numpy(out)

    def _check_slots(self, slots: np.ndarray) -> np.ndarray:
        if len(slots) and slots.max() >= self.size:
            raise StoreError(f"slot {int(slots.max())} out of range: store has {self.size} slots")
        if len(slots) and (self._slot_row.data[slots] < 0).any():
            raise StoreError(f"slots {slots[self._slot_row.data[slots] < 0][:5].tolist()} are evicted (no row)")
        return slots

    def rows_state(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """{"unit": (n, D), "norms": (n,)} exactly as stored, for resident `slots`."""
        slots = np.asarray(slots, dtype=np.int64)
        unit = np.zeros((len(slots), self.dim), dtype=np.float32)
        norms = np.zeros(len(slots), dtype=np.float32)
        with self._lock:
            self._check_slots(slots)
            shard_ids, rows = self._slot_shard.data[slots], self._slot_row.data[slots]
            for s in np.unique(shard_ids):
                mine = shard_ids == s
                unit[mine] = self.shards[s].unit_view()[rows[mine]]
                norms[mine] = self.shards[s].norms.data[rows[mine]]
        return {"unit": unit, "norms": norms}

    def load_rows(self, slots: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Restore rows bit for bit from `rows_state` output (or raw {"vectors"}, normalised here)."""
        slots = np.asarray(slots, dtype=np.int64)
        if "unit" in state:
            self._write_unit(slots, np.asarray(state["unit"], np.float32).reshape(-1, self.dim),
                             np.asarray(state["norms"], np.float32))
        else:
            self._write_unit(slots, *unit_and_norm(raw_vectors(state)))

    def state_dict(self) -> dict[str, Any]:
        """{"unit": (size, D), "norms": (size,)} in slot order: restores bit-exactly (no re-normalising).

        Shard-independent, so a snapshot restores into any shard count. Other backends read it
        through `raw_vectors(state)`; `load_state_dict` also accepts the base {"vectors": ...}.
        """
        with self._lock:
            unit = np.zeros((self.size, self.dim), dtype=np.float32)
            norms = np.zeros(self.size, dtype=np.float32)
            for shard in self.shards:
                used = shard.row_slot.data >= 0
                if shard.size:
                    unit[shard.row_slot.data[used]] = shard.unit_view()[used]
                    norms[shard.row_slot.data[used]] = shard.norms.data[used]
        return {"unit": unit, "norms": norms}

    def load_state_dict(self, state: dict[str, Any], ids: np.ndarray) -> None:
        if "unit" not in state:  # e.g. a TensorVectors snapshot
            super().load_state_dict(state, ids)
            return
        unit = np.asarray(state["unit"], dtype=np.float32).reshape(-1, self.dim)
        norms = np.asarray(state["norms"], dtype=np.float32)
        self.ensure(len(unit), ids)
        if len(unit):
            self._write_unit(np.arange(len(unit)), unit, norms)

    # ---- search --------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Iterable[int]] | None = None, *,
               limit: int | None = None, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` slots by cosine for each query, merged across shards, ties -> smaller slot first.

        Returns (scores (Q, k) float32, slots (Q, k) int64); missing results are -inf / -1.
        `exclude[q]` holds slots never returned for query q (e.g. items the user already saw), and
        slots >= `limit` are never returned. With "flat" (and IVF before training) the result
        equals one exact index over all slots.
        """
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim or k < 1:
            raise StoreError(f"search needs queries (Q, {self.dim}) and k >= 1, got {q.shape} and k={k}")
        if limit is not None and limit < self.size:
            beyond = np.arange(max(limit, 0), self.size, dtype=np.int64)
            exclude = [beyond] * len(q) if exclude is None else [
                np.concatenate([slot_array(slots), beyond]) for slots in exclude]
        if normalize:
            q = np.ascontiguousarray(unit_and_norm(q)[0])
        excluded = _ExcludeSet(exclude, len(q))
        parts_scores, parts_slots = [], []
        with self._lock:
            for s, shard in enumerate(self.shards):
                if shard.size == 0:
                    continue
                in_shard = excluded.per_query_count(self._slot_shard.data, s, self.size)
                scores, slots = self._search_shard(shard, q, k, in_shard, excluded)
                parts_scores.append(scores)
                parts_slots.append(slots)
        return _merge(parts_scores, parts_slots, len(q), k)

    def _search_shard(self, shard: Shard, q: np.ndarray, k: int, n_excluded: np.ndarray,
                      excluded: "_ExcludeSet") -> tuple[np.ndarray, np.ndarray]:
        """Candidates (scores, slots) of one shard, excluded ones already masked out.

        Exact shards fetch k + #excluded + 1 rows; a query whose boundary score is tied with
        fewer than k better rows is re-fetched with twice as many, so ties resolve by slot.
        """
        exact = shard.ann is None or not shard.ann.ready()
        fetch = np.minimum(shard.size, k + n_excluded + (1 if exact else 0))
        scores = slots = None
        todo = np.arange(len(q))
        while len(todo):
            width = int(fetch[todo].max())
            raw, rows = self._shard_index_search(shard, q if scores is None else q[todo], width, exact)
            found = np.where(rows >= 0, shard.row_slot.data[np.maximum(rows, 0)], _NO_SLOT)
            found = np.where(found < 0, _NO_SLOT, found)  # a free row (evicted entity)
            drop = (found == _NO_SLOT) | excluded.contains(todo, found)
            d, found = np.where(drop, -np.inf, raw), np.where(drop, _NO_SLOT, found)
            if scores is None or slots is None:  # first pass: every query (the common case ends here)
                scores, slots = d, found
            else:
                scores, slots = _put_rows(scores, slots, todo, d, found)
            if not exact:
                break
            # rows not fetched score <= the last fetched score: complete iff k kept rows beat it
            done = (width >= shard.size) | (np.sum(d > raw[:, -1:], axis=1) >= k)
            fetch[todo] = np.minimum(shard.size, 2 * width)
            todo = todo[~done]
        assert scores is not None and slots is not None, "search needs at least one query"
        return scores, slots

    def _shard_index_search(self, shard: Shard, q: np.ndarray, width: int,
                            exact: bool) -> tuple[np.ndarray, np.ndarray]:
        if not exact:
            assert shard.ann is not None  # exact = no ANN index, or one not trained yet
            return shard.ann.search(q, width)
        if self._gpu is not None:
            if shard.gpu_index is None:  # stale after a write: re-clone (O(shard) copy, only when searched)
                shard.gpu_index = faiss.index_cpu_to_gpu(self._gpu, max(self._device.index or 0, 0), shard.flat)
            return shard.gpu_index.search(q, width)
        return shard.flat.search(q, width)

    # ---- state, files, memory ------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Bytes held by vectors, norms, maps and ANN indexes (capacity, not just size)."""
        with self._lock:
            maps = self._slot_shard.nbytes + self._slot_row.nbytes
            return maps + sum(shard.memory_bytes() for shard in self.shards)

    def bytes_per_entity(self) -> float:
        return self.memory_bytes() / max(self.size, 1)

    def write_index_files(self, directory: str | Path, prefix: str = "") -> list[Path]:
        """Each shard as `<prefix>shard-NNNN.faiss` (+ ANN index) plus row->slot, norms and ids.

        `<prefix>index.json` describes the layout; vectors in the flat files are unit vectors,
        raw vector = unit * norm. Returns every path written (snapshots checksum them).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        with self._lock:
            for s, shard in enumerate(self.shards):
                base = directory / f"{prefix}shard-{s:04d}"
                written += write_shard(shard, base)
            layout = {"dim": self.dim, "shards": len(self.shards), "index_type": self.index_type,
                      "metric": "inner_product", "vectors": "unit", "size": self.size,
                      "shard_of": "crc32(utf8(id)) % shards", "shard_sizes": [sh.size for sh in self.shards]}
            meta_path = directory / f"{prefix}index.json"
            meta_path.write_text(json.dumps(layout, indent=1))
        return written + [meta_path]


class _ExcludeSet:
    """Per-query excluded slots as sorted (query, slot) keys: vectorised membership tests."""

    def __init__(self, exclude: Sequence[Iterable[int]] | None, n_queries: int) -> None:
        pairs_q: list[np.ndarray] = []
        pairs_s: list[np.ndarray] = []
        if exclude is not None:
            if len(exclude) != n_queries:
                raise StoreError(f"exclude has {len(exclude)} entries for {n_queries} queries")
            for qi, slots in enumerate(exclude):
                arr = np.unique(np.asarray(slots, dtype=np.int64) if isinstance(slots, np.ndarray)
                                else np.fromiter((int(x) for x in slots), dtype=np.int64))
                pairs_q.append(np.full(len(arr), qi, dtype=np.int64))
                pairs_s.append(arr)
        self.queries = np.concatenate(pairs_q) if pairs_q else np.zeros(0, dtype=np.int64)
        self.slots = np.concatenate(pairs_s) if pairs_s else np.zeros(0, dtype=np.int64)
        self.n_queries = n_queries
        self.keys = np.sort(self.queries * (1 << 40) + self.slots)

    def per_query_count(self, slot_shard: np.ndarray, shard: int, size: int) -> np.ndarray:
        """How many excluded slots of each query live in `shard`."""
        valid = (self.slots >= 0) & (self.slots < size)
        hits = valid.copy()
        hits[valid] = slot_shard[self.slots[valid]] == shard
        return np.bincount(self.queries[hits], minlength=self.n_queries)

    def contains(self, queries: np.ndarray, slots: np.ndarray) -> np.ndarray:
        if not len(self.keys):
            return np.zeros(slots.shape, dtype=bool)
        keys = queries[:, None] * (1 << 40) + np.where(slots == _NO_SLOT, -1, slots)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[pos] == keys


def _put_rows(scores: np.ndarray, slots: np.ndarray, todo: np.ndarray, d: np.ndarray,
              found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace rows `todo` of the candidate matrices with a (wider) fresh search."""
    width = max(scores.shape[1], d.shape[1])
    if width > scores.shape[1]:
        pad = width - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        slots = np.pad(slots, ((0, 0), (0, pad)), constant_values=_NO_SLOT)
    scores[todo], slots[todo] = -np.inf, _NO_SLOT
    scores[todo, : d.shape[1]], slots[todo, : d.shape[1]] = d, found
    return scores, slots


def _merge(parts_scores: list[np.ndarray], parts_slots: list[np.ndarray], n_queries: int,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k by (score desc, slot asc) over every shard's candidates."""
    if not parts_scores:
        return np.full((n_queries, k), -np.inf, np.float32), np.full((n_queries, k), -1, np.int64)
    scores, slots = np.concatenate(parts_scores, axis=1), np.concatenate(parts_slots, axis=1)
    order = np.lexsort((slots, -scores), axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    top_slots = np.take_along_axis(slots, order, axis=1)
    if top_slots.shape[1] < k:
        width = top_slots.shape[1]
        padded_scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        padded_slots = np.full((n_queries, k), _NO_SLOT, dtype=np.int64)
        padded_scores[:, :width], padded_slots[:, :width] = top_scores, top_slots
        top_scores, top_slots = padded_scores, padded_slots
    return top_scores, np.where(top_slots == _NO_SLOT, -1, top_slots)


def make_store(dim: int, cache_config: CacheConfig | None = None, device: torch.device | str = "cpu", *,
               spill_dir: str | Path | None = None, spill_read_only: bool = False,
               **options: Any) -> RepresentationStore:
    """A RepresentationStore whose user and item vectors live in sharded FAISS indexes.

    With `cache.max_entities` > 0 at most that many entities per kind stay in memory; the others
    spill to Parquet files in `spill_dir` (a private temporary directory when None; the worker
    uses `<snapshot root>/spill`), see felrec_stream/state/spill.py.
    """
    cache = cache_config or CacheConfig()
    return RepresentationStore(
        dim, cache.history_len, device,
        user_vectors=ShardedFaissVectors.from_config(dim, cache, device, **options),
        item_vectors=ShardedFaissVectors.from_config(dim, cache, device, **options),
        max_entities=cache.max_entities, spill_dir=spill_dir, spill_read_only=spill_read_only,
        popularity_halflife=cache.popularity_halflife,
    )


class _FaissPlan:
    """`stage`'s precomputation: unit vectors and norms, and per IVF shard the lists of its rows."""

    def __init__(self, flat: np.ndarray, unit: np.ndarray, norms: np.ndarray, shard_ids: np.ndarray,
                 lists: np.ndarray, generations: dict[int, int]) -> None:
        self.flat, self.unit, self.norms = flat, unit, norms
        self.shard_ids, self.lists, self.generations = shard_ids, lists, generations

    def lists_for(self, s: int, mine: np.ndarray, shard: Shard) -> np.ndarray | None:
        """The staged lists of shard `s`'s rows, if still valid: the rows are in the shard they were
        staged for and its quantizer is the one they were assigned with (else the write assigns)."""
        ann = shard.ann
        if (not isinstance(ann, IvfAnn) or self.generations.get(s) != ann.generation
                or not (self.shard_ids[mine] == s).all()):
            return None
        return self.lists[mine]

