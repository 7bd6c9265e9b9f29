"""The representation cache: growing user/item tables of vectors and last-L histories.

FELRec has no embedding layer: each entity's representation is whatever the encoder last wrote
for it. A `RepresentationStore` holds, per kind (users, items):

- an `IdMap` from external id (str) to a dense slot, growing as new ids appear;
- a `VectorBackend` with one D-dim vector per slot (missing -> zero vector). `TensorVectors`
  keeps them in a torch tensor (training, evaluation); the streaming worker swaps in a sharded
  FAISS backend implementing the same interface;
- a `HistoryBuffer`: the last L slots of the *other* kind each entity interacted with
  (right-aligned, -1 padding), plus interaction counts and last-update times.

With `max_entities` (cache.max_entities, per kind) the tables are `spill.SpillingTable`s: the least
recently touched entities move to Parquet files and come back on their next use; slots stay
stable (see felrec_stream/state/spill.py for the design).

Writes never go through autograd. All batch operations are vectorised (no per-event Python loop
except the id dict lookups).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from felrec_stream.config import CacheConfig
from felrec_stream.errors import StoreError


class Kind(str, Enum):
    USER = "user"
    ITEM = "item"

    @property
    def other(self) -> "Kind":
        return Kind.ITEM if self is Kind.USER else Kind.USER


class IdMap:
    """External id (str) <-> dense slot (0, 1, 2, ... in order of first appearance)."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._slot: dict[str, int] = {}
        self._ids: list[str] = []
        for external in ids:
            self._slot[external] = len(self._ids)
            self._ids.append(external)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, external: str) -> bool:
        return external in self._slot

    def lookup(self, ids: np.ndarray | list, create: bool = False) -> np.ndarray:
        """Slots of `ids` (int64); unknown ids get new slots when `create`, else -1."""
        get = self._slot.get
        if not create:
            return np.fromiter((get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        out = np.empty(len(ids), dtype=np.int64)
        for n, external in enumerate(ids):
            slot = get(external)
            if slot is None:
                slot = self._slot[external] = len(self._ids)
                self._ids.append(external)
            out[n] = slot
        return out

    def external(self, slots: np.ndarray) -> np.ndarray:
        ids = np.asarray(self._ids, dtype=object)
        return ids[np.asarray(slots, dtype=np.int64)]

    def ids(self) -> list[str]:
        return list(self._ids)

    def names(self, slots: Iterable[int]) -> list[str]:
        """External ids of a few slots in O(len(slots)) (`external` copies the whole id list)."""
        return [self._ids[int(slot)] for slot in slots]


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


def raw_vectors(state: dict[str, Any]) -> np.ndarray:
    """(size, D) raw vectors of a backend state: {"vectors"} or the FAISS backend's {"unit", "norms"}."""
    if "unit" in state:
        return np.asarray(state["unit"], np.float32) * np.asarray(state["norms"], np.float32)[:, None]
    return np.asarray(state["vectors"], dtype=np.float32)


class TensorVectors(VectorBackend):
    """Vectors in one growing torch tensor (capacity doubles), on any device."""

    def __init__(self, dim: int, device: torch.device | str = "cpu", capacity: int = 1024) -> None:
        self.dim = dim
        self._data = torch.zeros(max(capacity, 1), dim, device=torch.device(device))
        self._size = 0

    @property
    def device(self) -> torch.device:
        return self._data.device

    def ensure(self, size: int, ids: np.ndarray) -> None:
        if size > self._data.shape[0]:
            grown = torch.zeros(max(size, 2 * self._data.shape[0]), self.dim, device=self.device)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
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


# Per-slot columns of a HistoryBuffer, in EntityRows order: a capped table keeps them in memory for
# every slot, evicted or not (felrec_stream/state/spill.py).
SLOT_COLUMNS = ("lengths", "counts", "last_time", "pop", "pop_at")
POPULARITY = ("pop", "pop_at")  # absent from states written before popularity existed


@dataclass
class HistoryPlan:
    """Histories of one batch under the in-batch rule, and the rows to store once it commits."""

    event_history: np.ndarray  # (B, L) int64, slots of the other kind, right-aligned, -1 padding
    event_length: np.ndarray  # (B,) int64, valid entries per row
    unique_slots: np.ndarray  # (G,) slots touched by the batch
    new_rows: np.ndarray  # (G, L) their histories after the batch
    new_lengths: np.ndarray  # (G,)
    added: np.ndarray  # (G,) interactions added per slot


class HistoryBuffer:
    """Last-L interaction histories of every slot of one kind, plus interaction counts.

    Popularity: `popularity(slots)` is each slot's number of interactions, each weighted by
    0.5 ** (events since it / halflife) (halflife 0 = plain counts), counted in events applied to
    this buffer (`events`), so it needs no clock. Kept lazily: `pop[s]` is the weighted count at
    event index `pop_at[s]` (the last event that touched s)."""

    def __init__(self, length: int, capacity: int = 1024, halflife: float = 0.0) -> None:
        self.length = length
        self.halflife = halflife
        self.rows = np.full((max(capacity, 1), length), -1, dtype=np.int64)
        self.lengths = np.zeros(max(capacity, 1), dtype=np.int64)
        self.counts = np.zeros(max(capacity, 1), dtype=np.int64)
        self.last_time = np.zeros(max(capacity, 1), dtype=np.int64)
        self.pop = np.zeros(max(capacity, 1), dtype=np.float64)
        self.pop_at = np.zeros(max(capacity, 1), dtype=np.int64)
        self.events = 0
        self.size = 0

    def ensure(self, size: int) -> None:
        if size > len(self.rows):
            cap = max(size, 2 * len(self.rows))
            self.rows = _grow(self.rows, cap, -1)
            self.lengths = _grow(self.lengths, cap, 0)
            self.counts = _grow(self.counts, cap, 0)
            self.last_time = _grow(self.last_time, cap, 0)
            self.pop = _grow(self.pop, cap, 0)
            self.pop_at = _grow(self.pop_at, cap, 0)
        self.size = max(self.size, size)

    def reset(self) -> None:
        self.rows[:] = -1
        self.lengths[:] = 0
        self.counts[:] = 0
        self.last_time[:] = 0
        self.pop[:] = 0
        self.pop_at[:] = 0
        self.events = 0

    def decay(self, steps: np.ndarray | float) -> np.ndarray | float:
        """Weight of an interaction `steps` events ago."""
        steps = np.asarray(steps, dtype=np.float64)
        return 0.5 ** (steps / self.halflife) if self.halflife else np.ones_like(steps)

    def popularity(self, slots: np.ndarray, at: int | None = None) -> np.ndarray:
        """(n,) float64 weighted interaction counts of `slots` just before event index `at`
        (default: now, i.e. after every applied event)."""
        at = self.events if at is None else at
        return self.pop[slots] * self.decay(at - self.pop_at[slots])

    def plan(self, slots: np.ndarray, others: np.ndarray) -> HistoryPlan:
        """Histories for events (slots[i] interacted with others[i]), in batch order.

        Event i sees every *earlier* interaction of its slot: the stored history plus the earlier
        events of the same batch, at most L of them (the most recent).
        """
        L, B = self.length, len(slots)
        order = np.argsort(slots, kind="stable")  # groups contiguous, batch order kept inside
        sorted_slots = slots[order]
        starts = np.ones(B, dtype=bool)
        starts[1:] = sorted_slots[1:] != sorted_slots[:-1]
        group_sorted = np.cumsum(starts) - 1  # (B,)
        first_index = np.flatnonzero(starts)  # (G,)
        rank_sorted = np.arange(B) - first_index[group_sorted]
        unique_slots = sorted_slots[starts]
        added = np.diff(np.append(first_index, B))  # (G,)
        # M = [stored history (right-aligned in L) | this batch's others in order]
        M = np.full((len(unique_slots), L + int(added.max(initial=0))), -1, dtype=np.int64)
        M[:, :L] = self.stored_rows(unique_slots)
        M[group_sorted, L + rank_sorted] = others[order]
        group = np.empty(B, dtype=np.int64)
        rank = np.empty(B, dtype=np.int64)
        group[order], rank[order] = group_sorted, rank_sorted
        window = np.arange(L)
        event_history = M[group[:, None], rank[:, None] + window]  # (B, L)
        event_length = np.minimum(self.lengths[slots] + rank, L)
        new_rows = M[np.arange(len(unique_slots))[:, None], added[:, None] + window]
        new_lengths = np.minimum(self.lengths[unique_slots] + added, L)
        return HistoryPlan(event_history, event_length, unique_slots, new_rows, new_lengths, added)

    def stored_rows(self, slots: np.ndarray) -> np.ndarray:
        """(n, L) stored histories of `slots` (a copy)."""
        return self.rows[slots]

    def apply(self, plan: HistoryPlan, last_time: np.ndarray | None = None, slots: np.ndarray | None = None) -> None:
        """Store the batch's histories; with `slots` (the batch's event slots, in order) also count
        the events into the popularity, event i of the batch at index `events + i`."""
        self.store_rows(plan.unique_slots, plan.new_rows)
        self.lengths[plan.unique_slots] = plan.new_lengths
        self.counts[plan.unique_slots] += plan.added
        if last_time is not None:
            self.last_time[plan.unique_slots] = last_time
        if slots is not None:
            self._count(plan.unique_slots, slots)

    def _count(self, unique: np.ndarray, slots: np.ndarray) -> None:
        position = self.events + np.arange(len(slots))  # (B,) event index of each event
        last = np.zeros(len(unique), dtype=np.int64)
        group = np.searchsorted(unique, slots)  # (B,) unique is sorted
        np.maximum.at(last, group, position)
        added = np.zeros(len(unique), dtype=np.float64)
        np.add.at(added, group, self.decay(last[group] - position))
        self.pop[unique] = self.pop[unique] * self.decay(last - self.pop_at[unique]) + added
        self.pop_at[unique] = last
        self.events += len(slots)

    def store_rows(self, slots: np.ndarray, rows: np.ndarray) -> None:
        self.rows[slots] = rows

    def state_dict(self) -> dict[str, np.ndarray]:
        n = self.size
        return {"rows": self.rows[:n].copy(), "lengths": self.lengths[:n].copy(),
                "counts": self.counts[:n].copy(), "last_time": self.last_time[:n].copy(),
                "pop": self.pop[:n].copy(), "pop_at": self.pop_at[:n].copy(),
                "events": np.asarray([self.events], dtype=np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        n = len(state["lengths"])
        if state["rows"].shape[1:] != (self.length,):
            raise StoreError(f"history length mismatch: snapshot has {state['rows'].shape[1:]}, store {self.length}")
        self.ensure(n)
        self.rows[:n], self.lengths[:n] = state["rows"], state["lengths"]
        self.counts[:n], self.last_time[:n] = state["counts"], state["last_time"]
        if "pop" in state:  # states written before popularity existed count from here on
            self.pop[:n], self.pop_at[:n] = state["pop"], state["pop_at"]
            self.events = int(np.asarray(state["events"]).reshape(-1)[0])


def _grow(array: np.ndarray, capacity: int, fill: int) -> np.ndarray:
    grown = np.full((capacity,) + array.shape[1:], fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown


def last_occurrence(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique slots and the batch position of the *latest* event of each (deterministic)."""
    reversed_unique, reversed_index = np.unique(slots[::-1], return_index=True)
    return reversed_unique, len(slots) - 1 - reversed_index


@dataclass
class EntityRows:
    """Everything a table holds for some slots, read without changing the table."""

    vectors: dict[str, np.ndarray]  # backend row state: {"vectors"} or the FAISS {"unit", "norms"}
    rows: np.ndarray  # (n, L) history, slots of the other kind, -1 padding
    lengths: np.ndarray  # (n,)
    counts: np.ndarray  # (n,)
    last_time: np.ndarray  # (n,)
    pop: np.ndarray  # (n,) float64 decayed popularity as of event index pop_at (HistoryBuffer.popularity)
    pop_at: np.ndarray  # (n,)

    def raw(self) -> np.ndarray:
        """(n, D) float32 vectors as `VectorBackend.get` returns them."""
        return raw_vectors(self.vectors)


class EntityTable:
    """Ids, vectors and histories of one kind (every entity in memory)."""

    capped = False

    def __init__(self, kind: Kind, vectors: VectorBackend, history_len: int, popularity_halflife: float = 0.0) -> None:
        self.kind = kind
        self.ids = IdMap()
        self.vectors = vectors
        self.history = HistoryBuffer(history_len, halflife=popularity_halflife)

    def __len__(self) -> int:
        return len(self.ids)

    def slots(self, ids: np.ndarray, create: bool = True) -> np.ndarray:
        before = len(self.ids)
        slots = self.ids.lookup(ids, create=create)
        if len(self.ids) > before:
            new_ids = np.asarray(self.ids.ids()[before:], dtype=object)
            self.vectors.ensure(len(self.ids), new_ids)
            self.history.ensure(len(self.ids))
        return slots

    def read(self, slots: np.ndarray) -> EntityRows:
        """Vectors, histories, counts and times of `slots` (all >= 0), e.g. for queries and exports."""
        slots = np.asarray(slots, dtype=np.int64)
        h = self.history
        return EntityRows(self.vectors.rows_state(slots), h.stored_rows(slots),
                          *(getattr(h, key)[slots].copy() for key in SLOT_COLUMNS))

    def resident_slots(self) -> np.ndarray:
        """Slots held in memory (every slot here; a capped table leaves the evicted ones out)."""
        return np.arange(len(self), dtype=np.int64)

    def reset(self) -> None:
        self.vectors.reset()
        self.history.reset()

    def enforce_cap(self) -> None:
        """Nothing to evict: this table has no cap."""

    def state_dict(self) -> dict[str, Any]:
        return {"ids": self.ids.ids(), "vectors": self.vectors.state_dict(), "history": self.history.state_dict()}

    def check_state(self, state: dict[str, Any], dim: int) -> None:
        """The arrays of this kind's state have the shapes its ids, dim and history length imply
        (StoreError if not), checked before anything is loaded so a damaged state changes nothing."""
        if "spill" in state:
            raise StoreError(f"the {self.kind.value} state was written with cache.max_entities set (it refers to "
                             "spill files): load it into a store with a cap (--max-entities)")
        n, length, vectors, history = len(state["ids"]), self.history.length, state["vectors"], state["history"]
        parts = [(f"vectors.{key}", vectors[key], shape) for key, shape in vector_shapes(vectors, n, dim).items()]
        parts += [("history.rows", history["rows"], (n, length)), *slot_column_parts(history, n)]
        check_shapes(self.kind, parts, f"{n} ids, dim {dim}, history length {length}")
        check_lengths(self.kind, history["lengths"], length)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(self.ids):
            raise StoreError("load_state_dict needs an empty table")
        if "spill" in state:
            raise StoreError(f"the {self.kind.value} state was written with cache.max_entities set (it refers to "
                             "spill files): load it into a store with a cap (--max-entities)")
        ids = list(state["ids"])
        self.ids = IdMap(ids)
        self.vectors.load_state_dict(state["vectors"], np.asarray(ids, dtype=object))
        self.history.load_state_dict(state["history"])


class RepresentationStore:
    """User and item tables; the object the training loop, evaluator and worker all update.

    `max_entities` > 0 caps the entities held in memory per kind; the rest live in Parquet files
    under `spill_dir` (a private temporary directory when None). `spill_read_only`: a read replica
    that loads a snapshot and never evicts.
    """

    def __init__(self, dim: int, history_len: int = 64, device: torch.device | str = "cpu",
                 user_vectors: VectorBackend | None = None, item_vectors: VectorBackend | None = None, *,
                 popularity_halflife: float = 0.0, max_entities: int = 0, spill_dir: str | Path | None = None,
                 spill_read_only: bool = False) -> None:
        self.dim = dim
        self.history_len = history_len
        self.spill = None
        backends = {Kind.USER: user_vectors, Kind.ITEM: item_vectors}
        if max_entities > 0:
            from felrec_stream.state.spill import SpillFiles, SpillingTable, TensorRows  # spill builds on this module

            self.spill = SpillFiles(spill_dir, read_only=spill_read_only)
            self.tables: dict[Kind, EntityTable] = {
                kind: SpillingTable(kind, TensorRows(dim, device) if backend is None else backend, history_len,
                                    max_entities, self.spill, popularity_halflife)
                for kind, backend in backends.items()}
        else:
            self.tables = {kind: EntityTable(kind, TensorVectors(dim, device) if backend is None else backend,
                                             history_len, popularity_halflife)
                           for kind, backend in backends.items()}

    @classmethod
    def for_cache(cls, dim: int, cache: CacheConfig, device: torch.device | str = "cpu") -> "RepresentationStore":
        """An in-memory store shaped by a cache config (history length, popularity half-life); no cap:
        `cache.max_entities` is for the worker's store (`faiss_store.make_store`)."""
        return cls(dim, cache.history_len, device, popularity_halflife=cache.popularity_halflife)

    @property
    def users(self) -> EntityTable:
        return self.tables[Kind.USER]

    @property
    def items(self) -> EntityTable:
        return self.tables[Kind.ITEM]

    @property
    def device(self) -> torch.device:
        return self.users.vectors.device

    @property
    def max_entities(self) -> int:
        """The per-kind cap (0 = none)."""
        return getattr(self.users, "cap", 0)

    def reset(self) -> None:
        """Empty the cache and histories but keep id->slot maps (cheap epoch restarts)."""
        for table in self.tables.values():
            table.reset()

    def enforce_cap(self) -> None:
        """Evict down to the cap now (a capped table also does this after every history update)."""
        for table in self.tables.values():
            table.enforce_cap()

    def spill_refs(self) -> dict[str, dict[str, Any]]:
        """{file name: {"sha256", "size"}} of every spill file this state refers to ({} without a cap)."""
        if self.spill is None:
            return {}
        names = set().union(*(table.spill_names() for table in self.tables.values()))
        return self.spill.refs(names)

    def collect_spill(self, protected: Iterable[str] = ()) -> list[str]:
        """Delete spill files that neither this store nor `protected` (names) refers to; returns them."""
        if self.spill is None:
            return []
        live = set().union(*(table.spill_names() for table in self.tables.values()))
        return self.spill.delete_except(live | set(protected))

    def state_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "history_len": self.history_len,
                "users": self.users.state_dict(), "items": self.items.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a `state_dict()` into this empty store; the whole state is checked first, so a
        damaged one raises StoreError and leaves the store untouched (a restore can try an older one)."""
        if state["dim"] != self.dim or state["history_len"] != self.history_len:
            raise StoreError(f"store shape mismatch: state dim={state['dim']} history_len={state['history_len']}, "
                             f"store dim={self.dim} history_len={self.history_len}")
        for kind, table in self.tables.items():
            table.check_state(state[f"{kind.value}s"], self.dim)
        self.users.load_state_dict(state["users"])
        self.items.load_state_dict(state["items"])


def vector_shapes(vectors: dict[str, Any], n: int, dim: int) -> dict[str, tuple[int, ...]]:
    """Expected shapes of a backend's vector state for `n` rows ({"vectors"} or {"unit", "norms"})."""
    return {"vectors": (n, dim)} if "vectors" in vectors else {"unit": (n, dim), "norms": (n,)}


def slot_column_parts(history: dict[str, Any], n: int) -> list[tuple[str, Any, tuple[int, ...]]]:
    """(name, value, expected shape) of a history state's per-slot columns (popularity only when
    present: states written before it existed load with zero popularity)."""
    return [(f"history.{key}", history[key], (n,)) for key in SLOT_COLUMNS if key in history or key not in POPULARITY]


def check_shapes(kind: Kind, parts: Iterable[tuple[str, Any, tuple[int, ...]]], context: str) -> None:
    """StoreError naming the first (name, value, expected shape) whose shape differs."""
    for name, value, shape in parts:
        if np.shape(value) != shape:
            raise StoreError(f"{kind.value} {name} has shape {np.shape(value)}, expected {shape} ({context})")


def check_lengths(kind: Kind, lengths: Any, length: int) -> None:
    lengths = np.asarray(lengths)
    if lengths.size and (lengths.min() < 0 or lengths.max() > length):
        raise StoreError(f"{kind.value} history lengths outside [0, {length}]")
