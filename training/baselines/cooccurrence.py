"""Co-occurrence (item-kNN): a non-learned neighbour baseline over the user's last items.

Just before an event of user u, item i scores

    sum_p 0.5 ** (p / halflife) * log(1 + C[h_p, i])  (+ prior_weight * log(1 + recent popularity of i))

over u's last `history` items h_0 (newest), h_1, ...; C[j, i] counts the pairs of positions at
distance 1..`window` of some user's sequence that hold j and i (symmetric; a pair of one item with
itself is not counted), over every event applied so far: the training events, the warm-up and
the earlier evaluated events, earlier events of the same batch included (exact per event, as
training/protocol.py asks). The prior is `PopularityOnline`'s recent popularity, FELRec's prior.
An item that never co-occurred scores 0 (a new item is served once it co-occurs); a user without
history gets the prior alone (all zero without it: ties count half).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
import torch

from felrec_stream.scoring import halflife_decay, log_popularity, with_prior
from felrec_stream.state.store import HistoryBuffer, HistoryPlan, IdMap
from felrec_stream.stream.events import EventBatch, iter_batches
from training.baselines.configs import CooccurrenceConfig
from training.felrec_online import PopularityOnline
from training.protocol import EVAL_PARTITIONS, ItemCatalog

HISTORY_BATCH = 4096  # events counted at once when the training events are replayed


class DenseCounts:
    """C as a float32 (n, n) matrix, grown by doubling."""

    def __init__(self) -> None:
        self.n = 0
        self._m = np.zeros((0, 0), dtype=np.float32)

    def ensure(self, n: int) -> None:
        if n > len(self._m):
            grown = np.zeros((max(n, 2 * len(self._m)),) * 2, dtype=np.float32)
            grown[: self.n, : self.n] = self._m[: self.n, : self.n]
            self._m = grown
        self.n = max(self.n, n)

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        np.add.at(self._m, (a, b), 1.0)
        np.add.at(self._m, (b, a), 1.0)

    def votes(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(n,) sum_p weights[p] * log(1 + C[rows[p], :])."""
        return weights @ np.log1p(self._m[rows, : self.n])

    def to_sparse(self) -> "SparseCounts":
        sparse = SparseCounts()
        sparse.ensure(self.n)
        rows, cols = np.nonzero(self._m[: self.n, : self.n])
        upper = rows < cols  # C is symmetric: add() writes both halves
        for r, c in zip(rows[upper].tolist(), cols[upper].tolist()):
            times = int(self._m[r, c])
            sparse.add(np.full(times, r), np.full(times, c))
        return sparse


class SparseCounts:
    """C as one {column: count} dict per row: memory grows with the pairs met, not with n**2."""

    def __init__(self) -> None:
        self.n = 0
        self._rows: list[dict[int, float]] = []

    def ensure(self, n: int) -> None:
        self._rows.extend({} for _ in range(n - len(self._rows)))
        self.n = max(self.n, n)

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self._rows[x][y] = self._rows[x].get(y, 0.0) + 1.0
            self._rows[y][x] = self._rows[y].get(x, 0.0) + 1.0

    def votes(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float32)
        for row, weight in zip(rows.tolist(), weights.tolist()):
            counts = self._rows[row]
            if counts:
                cols = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
                values = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
                out[cols] += weight * np.log1p(values)  # a row's columns are distinct
        return out


class CooccurrenceOnline:
    """Recency-weighted item co-occurrence over the user's last items, as an OnlineModel."""

    partitions = frozenset(EVAL_PARTITIONS)  # no vocabulary: new users and items alike
    num_parameters = 0
    params_grow_with_data = False

    def __init__(self, config: CooccurrenceConfig, history: Iterable[pa.Table] = ()) -> None:
        history = list(history)
        self.config = config
        self.name = "Co-occurrence (item-kNN)"
        self._users, self._items = IdMap(), IdMap()
        self._recent = HistoryBuffer(max(config.history, config.window))  # item indices, per user
        self._counts: DenseCounts | SparseCounts = DenseCounts()
        self._popularity = PopularityOnline(history, config.prior_halflife)
        p = np.arange(config.history, dtype=np.float64)
        self._weights = halflife_decay(p, config.halflife).astype(np.float32)
        for table in history:
            for batch in iter_batches(table, HISTORY_BATCH):
                self._count_batch(batch)

    def score_batch(self, batch: EventBatch, catalog: ItemCatalog) -> torch.Tensor:
        votes, prior = self.score_parts(batch, catalog)
        return with_prior(votes, prior, self.config.prior_weight) if self.config.prior_weight else votes

    def score_parts(self, batch: EventBatch, catalog: ItemCatalog) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) co-occurrence votes and (B, C) log(1 + recent popularity) just before each event;
        then the batch is applied."""
        items, plan = self._plan(batch)
        votes = np.zeros((len(batch), self._counts.n), dtype=np.float32)
        for i in range(len(batch)):  # event by event: event i sees the counts of events < i
            before = self._newest_first(plan.event_history[i], plan.event_length[i])
            voters = before[: self.config.history]
            if len(voters):
                votes[i] = self._counts.votes(voters, self._weights[: len(voters)])
            self._pair(np.asarray([items[i]]), before[None, : self.config.window])
        self._recent.apply(plan)
        columns = torch.from_numpy(self._items.lookup(catalog.ids))  # (C,) every catalog item is known by now
        scores = torch.from_numpy(votes)[:, columns.clamp(min=0)].masked_fill_((columns < 0).unsqueeze(0), 0.0)
        prior = log_popularity(self._popularity.score_batch(batch, catalog))
        return scores, prior

    def _count_batch(self, batch: EventBatch) -> None:
        """Apply a batch without scoring it (the training events): all its pairs at once."""
        items, plan = self._plan(batch)
        L = plan.event_history.shape[1]
        self._pair(items, plan.event_history[:, L - self.config.window:])
        self._recent.apply(plan)

    def _plan(self, batch: EventBatch) -> tuple[np.ndarray, HistoryPlan]:
        """The batch's item indices (new items get empty rows) and each event's earlier items."""
        users = self._users.lookup(batch.user, create=True)
        items = self._items.lookup(batch.item, create=True)
        self._recent.ensure(len(self._users))
        self._ensure_counts(len(self._items))
        return items, self._recent.plan(users, items)

    def _ensure_counts(self, n: int) -> None:
        if n > self.config.max_dense_items and isinstance(self._counts, DenseCounts):
            self._counts = self._counts.to_sparse()
        self._counts.ensure(n)

    def _pair(self, items: np.ndarray, earlier: np.ndarray) -> None:
        """Count the pairs (items[k], earlier[k, j]) for every earlier item (-1 = none), both ways."""
        valid = (earlier >= 0) & (earlier != items[:, None])
        self._counts.add(np.broadcast_to(items[:, None], earlier.shape)[valid], earlier[valid])

    @staticmethod
    def _newest_first(row: np.ndarray, length: int) -> np.ndarray:
        return row[len(row) - length:][::-1] if length else row[:0]
