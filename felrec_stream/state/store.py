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

from pathlib import Path
from typing import Any, Iterable

import torch

from felrec_stream.config import CacheConfig
from felrec_stream.errors import StoreError
from felrec_stream.state.spill import SpillingTable
from felrec_stream.state.spill_files import SpillFiles
from felrec_stream.state.tables import (EntityRows, EntityTable, HistoryBuffer, HistoryPlan, IdMap, Kind,
                                        last_occurrence)
from felrec_stream.state.vectors import TensorRows, TensorVectors, VectorBackend, exact_top_k, raw_vectors

# The building blocks live in `tables` and `vectors`; they are importable from here too (one import
# path for the store and what it is made of).
__all__ = ["EntityRows", "EntityTable", "HistoryBuffer", "HistoryPlan", "IdMap", "Kind", "RepresentationStore",
           "TensorVectors", "VectorBackend", "exact_top_k", "last_occurrence", "raw_vectors"]


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
