"""Pooled storage of a capped table (felrec_stream/state/spill.py): its vectors and its histories.

`SpillingVectors` wraps any vector backend with residency: resident slots read from it, evicted
ones from their spill records, a write restores first. `PooledHistory` keeps history rows in a
pool of rows for resident slots and the per-slot columns for every slot. Both get what they need
from the table as callables, so no backend knows about spilling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from felrec_stream.state.tables import SLOT_COLUMNS, HistoryBuffer, HistoryPlan
from felrec_stream.state.vectors import StagedPut, VectorBackend, grow


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
        self.put_staged(StagedPut(slots, vectors))

    def stage(self, slots: torch.Tensor, vectors: torch.Tensor) -> StagedPut:
        return self.inner.stage(slots, vectors)  # a plan whose rows move on a restore is redone (inner's rule)

    def put_staged(self, staged: StagedPut) -> None:
        flat = torch.as_tensor(staged.slots).detach().cpu().reshape(-1).numpy().astype(np.int64, copy=False)
        self._restore(flat[flat >= 0])
        self.inner.put_staged(staged)
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
