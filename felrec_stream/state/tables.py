"""Tables of one kind: id maps, last-L histories and the `EntityTable` that holds them with a
`VectorBackend` (felrec_stream/state/vectors.py). `RepresentationStore` (felrec_stream/state/store.py)
puts a user and an item table together; `spill.SpillingTable` is the capped variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable

import numpy as np

from felrec_stream.errors import StoreError
from felrec_stream.scoring import halflife_decay
from felrec_stream.state.vectors import VectorBackend, grow, raw_vectors


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

    def lookup(self, ids: np.ndarray | list[str], create: bool = False) -> np.ndarray:
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
    0.5 ** (events since it / halflife) (halflife 0 = plain counts; `scoring.halflife_decay`),
    counted in events applied to this buffer (`events`), so it needs no clock. Kept lazily:
    `pop[s]` is the weighted count at event index `pop_at[s]` (the last event that touched s)."""

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
            self.rows = grow(self.rows, cap, -1)
            self.lengths = grow(self.lengths, cap, 0)
            self.counts = grow(self.counts, cap, 0)
            self.last_time = grow(self.last_time, cap, 0)
            self.pop = grow(self.pop, cap, 0)
            self.pop_at = grow(self.pop_at, cap, 0)
        self.size = max(self.size, size)

    def reset(self) -> None:
        self.rows[:] = -1
        self.lengths[:] = 0
        self.counts[:] = 0
        self.last_time[:] = 0
        self.pop[:] = 0
        self.pop_at[:] = 0
        self.events = 0

    def popularity(self, slots: np.ndarray, at: int | None = None) -> np.ndarray:
        """(n,) float64 weighted interaction counts of `slots` just before event index `at`
        (default: now, i.e. after every applied event)."""
        at = self.events if at is None else at
        return self.pop[slots] * halflife_decay(at - self.pop_at[slots], self.halflife)

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
        np.add.at(added, group, halflife_decay(last[group] - position, self.halflife))
        self.pop[unique] = self.pop[unique] * halflife_decay(last - self.pop_at[unique], self.halflife) + added
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

    def spill_names(self) -> set[str]:
        """Spill files holding current records of this table (none: it has no cap)."""
        return set()

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
