"""Per-slot vectors: the `VectorBackend` seam and its torch backends.

Every consumer of vectors (the engine, training, the query service, exports) goes through
`VectorBackend`: `get`/`put` for the engine, `rows`/`search` for queries, `index_type` and
`write_index_files` for what backs the search. `TensorVectors` keeps them in a torch tensor
(training, evaluation); `TensorRows` adds residency (slots whose storage can be freed: capped
tables, felrec_stream/state/spill.py); the streaming worker uses the sharded FAISS backend
(felrec_stream/state/faiss_store.py).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from felrec_stream.errors import StoreError


@dataclass(frozen=True)
class StagedPut:
    """A `put` whose costly, read-only part was computed ahead (`VectorBackend.stage`), so that the
    writer holds the query lock only for `put_staged`. `plan` is the backend's own precomputation
    (None: nothing to precompute; `put_staged` is then `put`)."""

    slots: torch.Tensor
    vectors: torch.Tensor
    plan: object = None


class VectorBackend(abc.ABC):
    """Dense per-slot vectors. Slot -1 reads as the zero vector; never-written slots read as zero."""

    dim: int

    @abc.abstractmethod
    def ensure(self, size: int, ids: np.ndarray) -> None:
        """Make room for slots [0, size); `ids` are the external ids of the new slots, in slot order."""

    @abc.abstractmethod
    def get(self, slots: torch.Tensor) -> torch.Tensor:
        """(..., D) float32 vectors of `slots` (any shape, int64, -1 = missing), on `self.device`."""

    @abc.abstractmethod
    def put(self, slots: torch.Tensor, vectors: torch.Tensor) -> None:
        """Overwrite rows `slots` (unique, >= 0) with `vectors` (N, D). Detached from autograd."""

    def stage(self, slots: torch.Tensor, vectors: torch.Tensor) -> StagedPut:
        """The read-only part of `put(slots, vectors)`, changing nothing (callable without the query
        lock by the store's one writer); `put_staged` applies it with the same result as `put`."""
        return StagedPut(slots, vectors)

    def put_staged(self, staged: StagedPut) -> None:
        self.put(staged.slots, staged.vectors)

    @abc.abstractmethod
    def reset(self) -> None:
        """Zero every vector (the paper empties the cache at each epoch start); slots are kept."""

    @abc.abstractmethod
    def all(self) -> torch.Tensor:
        """(size, D) vectors of every slot."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": self.all().detach().cpu().numpy().copy()}

    def load_state_dict(self, state: dict[str, Any], ids: np.ndarray) -> None:
        vectors = raw_vectors(state)
        self.ensure(len(vectors), ids)
        if len(vectors):
            self.put(torch.arange(len(vectors)), torch.from_numpy(vectors))

    def rows_state(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """Exactly what the backend holds for `slots` (resident), in `state_dict` format."""
        return {"vectors": self.get(torch.from_numpy(np.asarray(slots, np.int64))).cpu().numpy()}

    def load_rows(self, slots: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Inverse of `rows_state` (restores the rows bit for bit; not a write by the engine)."""
        self.put(torch.from_numpy(np.asarray(slots, np.int64)), torch.from_numpy(raw_vectors(state)))

    # Reads for the query side: numpy rows, cosine search, and what backs the search.

    index_type: str = "exact"  # "exact" (a scan), or the FAISS index kind ("flat", "hnsw", "ivf")
    writes_index_files = False  # True when `write_index_files` writes the FAISS files of this backend

    def rows(self, slots: np.ndarray) -> np.ndarray:
        """(n, D) float32 vectors of `slots` (all >= 0) as numpy: `get` without the caller touching torch."""
        return self.get(torch.from_numpy(np.asarray(slots, dtype=np.int64))).cpu().numpy()

    @abc.abstractmethod
    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Iterable[int]] | None = None, *,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, slots) of the `k` best cosines per query (Q, D), ties -> smaller slot first.

        `exclude[q]`: slots never returned for query q; slots >= `limit` are never returned either.
        Rows are (Q, k) with -1 slots / -inf scores where fewer were found (an exact scan returns
        min(k, candidates) columns instead). Only resident slots are ranked (capped tables)."""

    def write_index_files(self, directory: str | Path, prefix: str = "") -> list[Path]:
        """The FAISS files of this backend (`writes_index_files`); returns every path written."""
        raise StoreError(f"{type(self).__name__} has no index files (writes_index_files is False)")

    # Residency, for tables with a cap (spill.SpillingTable): `register` makes slots known
    # without storage, `admit` gives them zeroed storage, `evict` frees it.

    def register(self, size: int, ids: np.ndarray) -> None:
        raise StoreError(f"{type(self).__name__} cannot hold evicted entities (cache.max_entities)")

    def admit(self, slots: np.ndarray, ids: np.ndarray) -> None:
        raise StoreError(f"{type(self).__name__} cannot hold evicted entities (cache.max_entities)")

    def evict(self, slots: np.ndarray) -> None:
        raise StoreError(f"{type(self).__name__} cannot hold evicted entities (cache.max_entities)")

    def resident(self, slots: np.ndarray) -> np.ndarray:
        """(n,) bool: which of `slots` (all >= 0, registered) have storage here (all, without a cap)."""
        return np.ones(len(slots), dtype=bool)


def raw_vectors(state: dict[str, Any]) -> np.ndarray:
    """(size, D) raw vectors of a backend state: {"vectors"} or the FAISS backend's {"unit", "norms"}."""
    if "unit" in state:
        return np.asarray(state["unit"], np.float32) * np.asarray(state["norms"], np.float32)[:, None]
    return np.asarray(state["vectors"], dtype=np.float32)


class TensorVectors(VectorBackend):
    """Vectors in one growing torch tensor (capacity doubles), on any device; row = slot."""

    def __init__(self, dim: int, device: torch.device | str = "cpu", capacity: int = 1024) -> None:
        self.dim = dim
        self._data = torch.zeros(max(capacity, 1), dim, device=torch.device(device))
        self._size = 0  # slots

    @property
    def device(self) -> torch.device:
        return self._data.device

    def _reserve(self, rows: int) -> None:
        """Room for `rows` rows: the capacity at least doubles; new rows are zero."""
        if rows > self._data.shape[0]:
            grown = torch.zeros(max(rows, 2 * self._data.shape[0]), self.dim, device=self.device)
            grown[: self._data.shape[0]] = self._data
            self._data = grown

    def ensure(self, size: int, ids: np.ndarray) -> None:
        self._reserve(size)
        self._size = max(self._size, size)

    def get(self, slots: torch.Tensor) -> torch.Tensor:
        slots = slots.to(self.device)
        present = (slots >= 0).unsqueeze(-1)
        return self._data[slots.clamp(min=0)] * present

    def put(self, slots: torch.Tensor, vectors: torch.Tensor) -> None:
        self._data[slots.to(self.device)] = vectors.detach().to(self.device, torch.float32)

    def reset(self) -> None:
        self._data.zero_()

    def all(self) -> torch.Tensor:
        return self._data[: self._size]

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Iterable[int]] | None = None, *,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine scan over slots [0, limit)."""
        vectors = self.all()[:limit]
        return exact_search(vectors, None, queries, k, exclude)


class TensorRows(TensorVectors):
    """`TensorVectors` whose slots can lose their storage (capped tables, felrec_stream/state/spill.py):
    the tensor holds a pool of rows, a slot -> row map addresses it, and freed rows are reused (most
    recently freed first). `register` makes slots known without storage, `admit` gives them zeroed
    rows, `evict` frees them; a slot without a row reads as zero (the capped table reads it from its
    spill record instead)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu", capacity: int = 1024) -> None:
        super().__init__(dim, device, capacity)
        self._row = np.full(max(capacity, 1), -1, dtype=np.int64)  # slot -> pool row (-1: no storage)
        self._free: list[int] = []
        self._rows_used = 0

    def ensure(self, size: int, ids: np.ndarray) -> None:
        """Slots [0, size), the new ones with zeroed storage (register, then admit)."""
        old = self._size
        self.register(size, ids)
        if size > old:
            self.admit(np.arange(old, size, dtype=np.int64), ids)

    def register(self, size: int, ids: np.ndarray) -> None:
        if size > len(self._row):
            self._row = grow(self._row, max(size, 2 * len(self._row)), -1)
        self._size = max(self._size, size)

    def admit(self, slots: np.ndarray, ids: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) and (self._row[slots] >= 0).any():
            raise StoreError("admit: some slots already have rows")
        reused = min(len(self._free), len(slots))
        rows = np.empty(len(slots), dtype=np.int64)
        if reused:
            rows[:reused] = self._free[-reused:][::-1]
            del self._free[-reused:]
        rows[reused:] = np.arange(self._rows_used, self._rows_used + len(slots) - reused)
        self._rows_used += len(slots) - reused
        self._reserve(self._rows_used)
        self._data[torch.from_numpy(rows).to(self.device)] = 0.0
        self._row[slots] = rows

    def evict(self, slots: np.ndarray) -> None:
        rows = self._row[np.asarray(slots, dtype=np.int64)]
        if (rows < 0).any():
            raise StoreError("evict: some slots have no rows")
        self._row[slots] = -1
        self._free.extend(rows.tolist())

    def resident(self, slots: np.ndarray) -> np.ndarray:
        return self._row[np.asarray(slots, dtype=np.int64)] >= 0

    def _rows(self, slots: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self._row[slots]).to(self.device)

    def get(self, slots: torch.Tensor) -> torch.Tensor:
        flat = torch.as_tensor(slots).detach().cpu().reshape(-1).numpy().astype(np.int64, copy=False)
        index = torch.from_numpy(np.where(flat >= 0, self._row[np.maximum(flat, 0)], -1)).to(self.device)
        out = self._data[index.clamp(min=0)] * (index >= 0).unsqueeze(-1)
        return out.reshape(*torch.as_tensor(slots).shape, self.dim)

    def put(self, slots: torch.Tensor, vectors: torch.Tensor) -> None:
        self._write(torch.as_tensor(slots).detach().cpu().reshape(-1).numpy().astype(np.int64, copy=False), vectors)

    def _write(self, slots: np.ndarray, vectors: torch.Tensor | np.ndarray) -> None:
        self._data[self._rows(slots)] = torch.as_tensor(vectors).detach().to(self.device, torch.float32).reshape(
            len(slots), -1)

    def rows_state(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        return {"vectors": self._data[self._rows(np.asarray(slots, dtype=np.int64))].cpu().numpy()}

    def load_rows(self, slots: np.ndarray, state: dict[str, np.ndarray]) -> None:
        self._write(np.asarray(slots, dtype=np.int64), torch.from_numpy(raw_vectors(state)))

    def _resident_slots(self) -> np.ndarray:
        return np.flatnonzero(self._row[: self._size] >= 0)

    def all(self) -> torch.Tensor:
        """(size, D) vectors of every slot: those without storage read as zero."""
        out = torch.zeros(self._size, self.dim, device=self.device)
        resident = self._resident_slots()
        out[torch.from_numpy(resident).to(self.device)] = self._data[self._rows(resident)]
        return out

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Iterable[int]] | None = None, *,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine scan over the resident slots below `limit` (ascending slots keep the tie order)."""
        resident = self._resident_slots()
        if limit is not None:
            resident = resident[resident < limit]
        return exact_search(self._data[self._rows(resident)], resident, queries, k, exclude)


def exact_top_k(vectors: torch.Tensor, query: np.ndarray, k: int,
                exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k by (score desc, slot asc), like ShardedFaissVectors.search; zero rows score 0."""
    x = vectors.detach().to("cpu", torch.float32)
    q = torch.as_tensor(np.asarray(query, dtype=np.float32))
    q = q / q.norm() if float(q.norm()) > 0 else q
    norms = x.norm(dim=1)
    scores = ((x @ q) / torch.where(norms > 0, norms, torch.ones_like(norms))).numpy().copy()
    exclude = exclude[(exclude >= 0) & (exclude < len(scores))]
    scores[exclude] = -np.inf
    k = min(k, len(scores))
    if k == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]
    candidates = np.flatnonzero(scores >= kth)  # ties at the boundary resolve by slot below
    order = candidates[np.lexsort((candidates, -scores[candidates]))][:k]
    # excluded rows score -inf: -1 marks them, as FAISS pads (callers treat every slot >= 0 as a candidate)
    return scores[order].astype(np.float32), np.where(np.isfinite(scores[order]), order, -1).astype(np.int64)


def exact_search(vectors: torch.Tensor, slots: np.ndarray | None, queries: np.ndarray, k: int,
                 exclude: Sequence[Iterable[int]] | None) -> tuple[np.ndarray, np.ndarray]:
    """`exact_top_k` per query over `vectors`, whose row i holds slot `slots[i]` (ascending; None: slot i).

    Returns (Q, min(k, rows)) scores and slots."""
    queries = np.asarray(queries, dtype=np.float32)
    if exclude is not None and len(exclude) != len(queries):
        raise StoreError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
    found_scores, found_slots = [], []
    for q, query in enumerate(queries):
        excluded = np.zeros(0, np.int64) if exclude is None else slot_array(exclude[q])
        positions = excluded if slots is None else np.flatnonzero(np.isin(slots, excluded))
        scores, found = exact_top_k(vectors, query, k, positions)
        found_scores.append(scores)
        found_slots.append(found if slots is None else np.where(found >= 0, slots[np.maximum(found, 0)], -1))
    width = min(k, len(vectors))
    if not found_scores:
        return np.zeros((0, width), np.float32), np.zeros((0, width), np.int64)
    return np.stack(found_scores), np.stack(found_slots)


def slot_array(slots: Iterable[int]) -> np.ndarray:
    if isinstance(slots, np.ndarray):
        return slots.astype(np.int64, copy=False)
    return np.fromiter((int(s) for s in slots), dtype=np.int64)


def grow(array: np.ndarray, capacity: int, fill: Any) -> np.ndarray:
    grown = np.full((capacity,) + array.shape[1:], fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown



