"""The baselines as `OnlineModel`s for the shared evaluator, and their training loops.

Every adapter is built from the training events (its vocabulary = the training users/items),
trained by `fit` (one SGD step per batch, best validation checkpoint kept) and then replayed by
`training.evaluate.evaluate`, whose `score_batch` calls both score and *then* update the state:
- BPR-MF is static: it serves observed users and items only;
- GRU4Rec, GRU4Rec-BPTT and SASRec keep per-user states/histories that grow with the replayed
  events (a new user starts from an empty session and is served; a new item has no embedding row,
  scores -inf and, as an input, counts as "no item");
- JODIE* keeps dynamic embeddings for every user/item, new ones included, and keeps learning
  at test time (gradient steps on the replayed events, after they were scored).
Items a model cannot represent score -inf; partitions it cannot serve are not in `partitions`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from felrec_stream.device import resolve_device
from felrec_stream.errors import TrainingError
from felrec_stream.log import get_logger
from felrec_stream.model.felrec import count_parameters
from felrec_stream.state.store import HistoryBuffer, IdMap, last_occurrence
from felrec_stream.stream.events import EventBatch, iter_batches
from training.baselines import models as M
from training.baselines.configs import (BaselineConfig, BPRMFConfig, GRU4RecBPTTConfig, GRU4RecConfig,
                                        JodieConfig, SASRecConfig)
from training.protocol import EVAL_PARTITIONS, ItemCatalog

log = get_logger(__name__)

OBSERVED = frozenset({"observed"})
NO_NEW_ITEMS = frozenset({"observed", "new_user"})
ALL = frozenset(EVAL_PARTITIONS)


def unique_ids(table: pa.Table, column: str) -> list[str]:
    """Distinct ids of a column in order of first appearance (deterministic vocabularies)."""
    return pc.unique(table.column(column)).to_pylist()


def rank_within(keys: np.ndarray) -> np.ndarray:
    """(B,) number of *earlier* positions holding the same key (0 for a key's first event)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    first = np.flatnonzero(starts)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - first[np.cumsum(starts) - 1]
    return rank


def gather_catalog(scores: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """scores (B, V) over model indices, columns (C,) model index per catalog item (-1 = the model
    has no row for it) -> (B, C), -inf for unknown items."""
    out = scores[:, columns.clamp(min=0)]  # (B, C)
    return out.masked_fill((columns < 0).unsqueeze(0), float("-inf"))


def known_or_minus_one(index: np.ndarray) -> np.ndarray:
    """Map the "unknown" row 0 of 1-based vocabularies to -1 (no catalog column)."""
    return np.where(index > 0, index, -1)


class CatalogColumns:
    """Model index of every catalog position, extended incrementally as the catalog grows."""

    def __init__(self, lookup: Callable[[list[str]], np.ndarray]) -> None:
        self._lookup = lookup
        self._catalog: ItemCatalog | None = None
        self._columns = np.empty(0, dtype=np.int64)

    def __call__(self, catalog: ItemCatalog, device: torch.device) -> torch.Tensor:
        if catalog is not self._catalog:
            self._catalog, self._columns = catalog, np.empty(0, dtype=np.int64)
        if len(catalog) > len(self._columns):
            self._columns = np.concatenate([self._columns, self._lookup(catalog.ids[len(self._columns):])])
        return torch.from_numpy(self._columns).to(device)


class Vocabulary:
    """Training ids -> indices offset..offset+n-1; unknown ids -> `unknown`."""

    def __init__(self, ids: list[str], offset: int, unknown: int) -> None:
        self.ids = IdMap(ids)
        self.offset, self.unknown = offset, unknown

    def __len__(self) -> int:
        return len(self.ids)

    def __call__(self, ids: Any) -> np.ndarray:
        slots = self.ids.lookup(ids)
        return np.where(slots >= 0, slots + self.offset, self.unknown)


@dataclass
class FitResult:
    """The model kept (best validation rank, or the last epoch without validation) and the log."""

    model: "BaselineOnline"
    best_epoch: int
    best_val_rank: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


class BaselineOnline:
    """Shared plumbing: config, device, optimiser, negative sampling, parameter counting."""

    name: str = "baseline"
    partitions: frozenset[str] = OBSERVED
    params_grow_with_data = True  # embedding tables / one-hot layers are sized by the catalog

    def __init__(self, config: BaselineConfig, model: nn.Module) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def negatives(self, shape: tuple[int, ...], low: int, high: int) -> torch.Tensor:
        """Uniform item indices in [low, high) of the given shape (BPR negatives)."""
        return torch.randint(low, high, shape, generator=self.generator, device=self.device)

    def sgd_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()

    def train_epoch(self, train: pa.Table) -> float:
        """One pass over the training events; returns the mean loss."""
        raise NotImplementedError

    def score_batch(self, batch: EventBatch, catalog: ItemCatalog) -> torch.Tensor:
        raise NotImplementedError


def fit(adapter: BaselineOnline, train: pa.Table,
        validate: Callable[[BaselineOnline], float] | None = None) -> FitResult:
    """Train for `config.epochs`, validating every `eval_every` epochs on a *copy* (replaying the
    validation events changes a model's state); keep a copy of the best one. Without `validate`
    the last epoch is kept. A non-finite loss ends training (a diverged model scores NaN)."""
    cfg = adapter.config
    best, best_epoch, best_val, stale = adapter, 0, None, 0
    history: list[dict[str, Any]] = []
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        loss = adapter.train_epoch(train)
        record: dict[str, Any] = {"epoch": epoch, "loss": loss, "seconds": round(time.perf_counter() - started, 3)}
        history.append(record)
        if validate is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs) and math.isfinite(loss):
            record["val_rank"] = val = float(validate(copy.deepcopy(adapter)))
            loss = loss if math.isfinite(val) else math.nan  # NaN scores: diverged as well
        if not math.isfinite(loss):
            best_epoch = best_epoch if validate is not None else 0  # without validation nothing sane is kept
            log.error("baseline_diverged", model=adapter.name, epoch=epoch, kept_epoch=best_epoch)
            break
        if validate is None:
            best_epoch = epoch
        elif "val_rank" in record:
            if best_val is None or val < best_val:
                best, best_epoch, best_val, stale = copy.deepcopy(adapter), epoch, val, 0
            else:
                stale += 1
        log.info("baseline_epoch_done", model=adapter.name, **record)
        if cfg.patience and stale >= cfg.patience:
            log.info("baseline_early_stop", model=adapter.name, epoch=epoch, best_epoch=best_epoch)
            break
    if best_epoch == 0:
        raise TrainingError(f"{adapter.name} diverged before a usable checkpoint (loss {history[-1]['loss']}); "
                            f"lower its learning rate or set max_grad_norm")
    return FitResult(best, best_epoch, best_val, history)


# --------------------------------------------------------------------------------------------
# BPR-MF


class BPRMFOnline(BaselineOnline):
    """BPR-MF: static user/item factors; serves observed users and items only."""

    name = "BPR-MF"
    partitions = OBSERVED

    def __init__(self, config: BPRMFConfig, train: pa.Table) -> None:
        torch.manual_seed(config.seed)
        self.users = Vocabulary(unique_ids(train, "user"), 1, 0)
        self.items = Vocabulary(unique_ids(train, "item"), 1, 0)
        super().__init__(config, M.BPRMF(len(self.users), len(self.items), config.dim))
        self.rng = np.random.default_rng(config.seed)
        self.columns = CatalogColumns(lambda ids: known_or_minus_one(self.items(ids)))

    def train_epoch(self, train: pa.Table) -> float:
        """Shuffled (u, i) pairs, each with `num_negatives` uniform j."""
        users = torch.from_numpy(self.users(train.column("user").to_pylist())).to(self.device)
        items = torch.from_numpy(self.items(train.column("item").to_pylist())).to(self.device)
        order = torch.from_numpy(self.rng.permutation(len(users))).to(self.device)
        self.model.train()
        total, B = 0.0, self.config.batch_size
        for start in range(0, len(order), B):
            idx = order[start:start + B]
            pos = self.model(users[idx], items[idx].unsqueeze(1)).squeeze(1)  # (B,)
            neg = self.model(users[idx], self.negatives((len(idx), self.config.num_negatives), 1, len(self.items) + 1))
            loss = M.bpr_loss(pos, neg)
            self.sgd_step(loss)
            total += float(loss.detach()) * len(idx)
        return total / max(len(order), 1)

    @torch.no_grad()
    def score_batch(self, batch: EventBatch, catalog: ItemCatalog) -> torch.Tensor:
        self.model.eval()
        users = torch.from_numpy(self.users(batch.user)).to(self.device)
        return gather_catalog(self.model.score_all(users), self.columns(catalog, self.device))  # (B, C)


# --------------------------------------------------------------------------------------------
# GRU4Rec (one-hot input, one step per event, cached per-user session states)


class GRU4RecOnline(BaselineOnline):
    """GRU4Rec: each user is one session; its hidden states are cached and reused when the user
    reappears. A batch is processed in steps: step r handles every user's r-th event of the batch,
    so an event sees all earlier events of its user (never itself). No BPTT: states are detached."""

    name = "GRU4Rec"
    partitions = NO_NEW_ITEMS

    def __init__(self, config: GRU4RecConfig, train: pa.Table) -> None:
        torch.manual_seed(config.seed)
        self.items = Vocabulary(unique_ids(train, "item"), 1, 0)
        super().__init__(config, M.GRU4Rec(len(self.items), config.hidden, config.n_layers, config.dropout))
        self.columns = CatalogColumns(lambda ids: known_or_minus_one(self.items(ids)))
        self.reset_state()

    def reset_state(self) -> None:
        self.user_ids = IdMap()
        self.hidden = torch.zeros(0, self.config.n_layers, self.config.hidden, device=self.device)  # (U, L, H)
        self.prev_item = np.zeros(0, dtype=np.int64)  # (U,) item index of the user's last event, 0 = none

    def _user_slots(self, users: np.ndarray) -> np.ndarray:
        slots = self.user_ids.lookup(users, create=True)
        grow = len(self.user_ids) - len(self.prev_item)
        if grow > 0:
            self.hidden = torch.cat([self.hidden, self.hidden.new_zeros(grow, *self.hidden.shape[1:])])
            self.prev_item = np.concatenate([self.prev_item, np.zeros(grow, dtype=np.int64)])
        return slots

    def _replay(self, batch: EventBatch) -> tuple[torch.Tensor, np.ndarray]:
        """Run the batch step by step; returns outputs (B, H) (before each event) and item indices."""
        slots, items = self._user_slots(batch.user), self.items(batch.item)
        rank = rank_within(slots)
        outputs = self.hidden.new_empty(len(batch), self.config.hidden)
        for r in range(int(rank.max(initial=-1)) + 1):
            sel = np.flatnonzero(rank == r)
            u = torch.from_numpy(slots[sel]).to(self.device)
            prev = torch.from_numpy(self.prev_item[slots[sel]]).to(self.device)
            h, out = self.model.step(prev, self.hidden[u])  # (b, L, H), (b, H)
            outputs = outputs.index_copy(0, torch.from_numpy(sel).to(self.device), out)
            self.hidden[u] = h.detach()
            self.prev_item[slots[sel]] = items[sel]
        return outputs, items

    def train_epoch(self, train: pa.Table) -> float:
        self.model.train()
        self.reset_state()
        total, n = 0.0, 0
        for batch in iter_batches(train, self.config.batch_size):
            out, items = self._replay(batch)
            target = torch.from_numpy(items).to(self.device)
            pos = self.model(out, target.unsqueeze(1)).squeeze(1)  # (B,)
            neg = self.model(out, self.negatives((len(batch), self.config.num_negatives), 1, len(self.items) + 1))
            loss = M.bpr_loss(pos, neg)
            self.sgd_step(loss)
            total, n = total + float(loss.detach()) * len(batch), n + len(batch)
        return total / max(n, 1)

    @torch.no_grad()
    def score_batch(self, batch: EventBatch, catalog: ItemCatalog) -> torch.Tensor:
        self.model.eval()
        out, _ = self._replay(batch)
        return gather_catalog(self.model.score_all(out), self.columns(catalog, self.device))


# --------------------------------------------------------------------------------------------
# Sequence models: GRU4Rec-BPTT and SASRec


class SequenceOnline(BaselineOnline):
    """A causal sequence model over each user's last `max_len` items (START first while the whole
    history fits). Training: per batch, one row per user ending at its last event of the batch
    (plus one every `max_len` events before it), BPR loss at every position with shared negatives.
    Scoring: one row per event holding the user's items before it, output at its last position."""

    partitions = NO_NEW_ITEMS

    def __init__(self, config: GRU4RecBPTTConfig | SASRecConfig, model: nn.Module, items: Vocabulary) -> None:
        self.items = items
        super().__init__(config, model)
        self.columns = CatalogColumns(self.items)
        self.reset_state()

    def reset_state(self) -> None:
        self.user_ids = IdMap()
        self.history = HistoryBuffer(self.config.max_len)  # per user: item indices (-1 = unknown item)

    def _plan(self, batch: EventBatch) -> tuple[Any, np.ndarray, np.ndarray]:
        slots = self.user_ids.lookup(batch.user, create=True)
        self.history.ensure(len(self.user_ids))
        items = self.items(batch.item)  # (B,), -1 for items without an embedding row
        return self.history.plan(slots, items), slots, items

    def _sequences(self, plan: Any, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Left-aligned inputs (R, T) of the chosen events and their lengths (R,)."""
        L = self.config.max_len
        hist, length = plan.event_history[rows], plan.event_length[rows]  # (R, L) right-aligned, -1 pad
        valid = hist >= 0
        compact = np.take_along_axis(hist, np.argsort(~valid, axis=1, kind="stable"), axis=1)  # valid first
        n = valid.sum(axis=1)
        start = (length < L) | (n == 0)  # the whole history fits: mark its beginning
        shift = start.astype(np.int64)
        lengths = n + shift
        j = np.arange(L)[None, :] - shift[:, None]  # source position in compact
        take = np.take_along_axis(compact, np.clip(j, 0, L - 1), axis=1)
        seq = np.where((j >= 0) & (j < n[:, None]), take, M.PAD)
        seq[start, 0] = M.START
        T = int(lengths.max(initial=1))
        return torch.from_numpy(seq[:, :T]).to(self.device), lengths

    def _training_rows(self, slots: np.ndarray) -> np.ndarray:
        """Events ending a training row: each user's last event of the batch and every max_len-th before."""
        later = rank_within(slots[::-1])[::-1]  # events of the same user after this one
        return np.flatnonzero(later % self.config.max_len == 0)

    def train_epoch(self, train: pa.Table) -> float:
        self.model.train()
        self.reset_state()
        total, n = 0.0, 0
        for batch in iter_batches(train, self.config.batch_size):
            plan, slots, items = self._plan(batch)
            rows = self._training_rows(slots)
            loss, count = self._row_loss(plan, rows, items)
            self.sgd_step(loss)
            self.history.apply(plan)
            total, n = total + float(loss.detach()) * count, n + count
        return total / max(n, 1)

    def _row_loss(self, plan: Any, rows: np.ndarray, items: np.ndarray) -> tuple[torch.Tensor, int]:
        """BPR at every position: position t predicts input t+1, the last one the event's item."""
        seq, lengths = self._sequences(plan, rows)  # (R, T)
        R, T = seq.shape
        target = torch.cat([seq[:, 1:], seq.new_zeros(R, 1)], dim=1)  # (R, T)
        last = torch.from_numpy(lengths - 1).to(self.device)
        target[torch.arange(R, device=self.device), last] = torch.from_numpy(items[rows]).to(self.device)
        mask = torch.arange(T, device=self.device)[None, :] <= last[:, None]  # (R, T)
        out = self.model(seq)  # (R, T, D)
        negs = self.negatives((R, self.config.num_negatives), M.FIRST_ITEM, len(self.items) + M.FIRST_ITEM)
        pos = self.model.score(out, target.unsqueeze(-1)).squeeze(-1)  # (R, T)
        neg = torch.einsum("rtd,rnd->rtn", out, self.model.E(negs))  # (R, T, N)
        return M.bpr_loss(pos, neg, mask), int(mask.sum())

    @torch.no_grad()
    def score_batch(self, batch: EventBatch, catalog: ItemCatalog) -> torch.Tensor:
        self.model.eval()
        plan, _, _ = self._plan(batch)
        seq, lengths = self._sequences(plan, np.arange(len(batch)))  # (B, T)
        last = torch.from_numpy(lengths - 1).to(self.device)
        out = self.model(seq)[torch.arange(len(batch), device=self.device), last]  # (B, D)
        self.history.apply(plan)
        return gather_catalog(self.model.score_all(out), self.columns(catalog, self.device))


class GRU4RecBPTTOnline(SequenceOnline):
    name = "GRU4Rec-BPTT"

    def __init__(self, config: GRU4RecBPTTConfig, train: pa.Table) -> None:
        torch.manual_seed(config.seed)
        items = Vocabulary(unique_ids(train, "item"), M.FIRST_ITEM, -1)
        super().__init__(config, M.GRU4RecBPTT(len(items), config.dim, config.n_layers, config.dropout), items)


class SASRecOnline(SequenceOnline):
    name = "SASRec"

    def __init__(self, config: SASRecConfig, train: pa.Table) -> None:
        torch.manual_seed(config.seed)
        items = Vocabulary(unique_ids(train, "item"), M.FIRST_ITEM, -1)
        super().__init__(config, M.SASRec(len(items), config.encoder, config.max_len), items)  # dropout: encoder's


# --------------------------------------------------------------------------------------------
# JODIE*


@dataclass
class JodieState:
    """One kind's dynamic JODIE state (users or items), grown as new ids arrive."""

    ids: IdMap
    dyn: torch.Tensor  # u(t) or i(t), (n, D)
    seen: np.ndarray  # (n,) bool: updated at least once
    last: np.ndarray  # (n,) int64: time of the latest interaction

    @classmethod
    def fresh(cls, ids: list[str], dim: int, device: torch.device) -> "JodieState":
        n = len(ids)
        return cls(IdMap(ids), torch.zeros(n, dim, device=device), np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64))

    def slots(self, ids: Any) -> tuple[np.ndarray, int]:
        """(slots of `ids`, number of new slots); new ids get zero rows."""
        slots = self.ids.lookup(ids, create=True)
        grow = len(self.ids) - len(self.seen)
        if grow > 0:
            self.dyn = torch.cat([self.dyn, self.dyn.new_zeros(grow, self.dyn.shape[1])])
            self.seen = np.append(self.seen, np.zeros(grow, bool))
            self.last = np.append(self.last, np.zeros(grow, np.int64))
        return slots, grow


class JodieOnline(BaselineOnline):
    """JODIE* with the naive time-ordered batching of FELRec: every event of a batch reads the
    dynamic embeddings as they were before the batch; each user/item touched keeps the embedding
    of its latest event. Gradients flow through the dynamic state for `bptt_batches` batches, then
    one SGD step; the same step runs at test time after the batch was scored (online learning).

    New users/items get the learned initial embedding u(0)/i(0) and the zero static embedding
    (the static tables only have rows for training entities), then evolve through the RNNs."""

    name = "JODIE*"
    partitions = ALL

    def __init__(self, config: JodieConfig, train: pa.Table) -> None:
        torch.manual_seed(config.seed)
        self.train_users, self.train_items = unique_ids(train, "user"), unique_ids(train, "item")
        super().__init__(config, M.Jodie(len(self.train_users), len(self.train_items), config.dim, config.static_dim))
        ts = train.column("timestamp")
        self.time_scale = math.log1p(max(int(pc.max(ts).as_py()) - int(pc.min(ts).as_py()), 1))
        self.columns = CatalogColumns(self._item_slots)
        self.reset_state()

    def reset_state(self) -> None:
        """Fresh dynamic state (JODIE re-initialises it every epoch); training entities keep slots."""
        self.users = JodieState.fresh(self.train_users, self.config.dim, self.device)
        self.items = JodieState.fresh(self.train_items, self.config.dim, self.device)
        self.user_prev = np.full(len(self.train_users), -1, dtype=np.int64)  # item slot of the previous event
        self.pending: list[torch.Tensor] = []

    def _user_slots(self, ids: Any) -> np.ndarray:
        slots, grow = self.users.slots(ids)
        if grow > 0:
            self.user_prev = np.append(self.user_prev, np.full(grow, -1, np.int64))
        return slots

    def _item_slots(self, ids: Any) -> np.ndarray:
        return self.items.slots(ids)[0]

    def _dynamic(self, kind: str, slots: np.ndarray) -> torch.Tensor:
        """(n, D) current dynamic embeddings; never-updated entities read the learned initial one."""
        state, init = (self.users, self.model.initial_user) if kind == "user" else (self.items, self.model.initial_item)
        rows = state.dyn[torch.from_numpy(slots).to(self.device)]
        mask = torch.from_numpy(state.seen[slots]).to(self.device).unsqueeze(-1)
        return torch.where(mask, rows, init.expand_as(rows))

    def _static_index(self, slots: np.ndarray, n_train: int) -> torch.Tensor:
        """Static-table row of slots (training entity s -> s + 1; later ones and -1 -> 0 = zero)."""
        return torch.from_numpy(np.where((slots >= 0) & (slots < n_train), slots + 1, 0)).to(self.device)

    def _delta(self, t: np.ndarray, last: np.ndarray, seen: np.ndarray) -> torch.Tensor:
        """(B, 1) log-scaled time since the previous interaction (0 for a first one)."""
        delta = np.where(seen, np.maximum(t - last, 0), 0).astype(np.float64)
        return torch.from_numpy(np.log1p(delta) / self.time_scale).float().to(self.device).unsqueeze(-1)

    def _targets(self, slots: np.ndarray) -> torch.Tensor:
        """[i(t-), i_bar] (..., D+S) of item slots of any shape."""
        flat = slots.reshape(-1)
        dyn = self._dynamic("item", flat)
        out = self.model.item_targets(self._static_index(flat, len(self.train_items)), dyn)
        return out.reshape(*slots.shape, -1)

    def _step(self, batch: EventBatch, catalog: ItemCatalog | None) -> tuple[torch.Tensor | None, float]:
        """Predict, (score), loss, mutual RNN update and write-back of one batch -> (scores, loss)."""
        us, it = self._user_slots(batch.user), self._item_slots(batch.item)
        columns = self.columns(catalog, self.device).cpu().numpy() if catalog is not None else None
        u_prev, i_prev = self._dynamic("user", us), self._dynamic("item", it)  # (B, D)
        du = self._delta(batch.timestamp, self.users.last[us], self.users.seen[us])
        di = self._delta(batch.timestamp, self.items.last[it], self.items.seen[it])
        prev = self.user_prev[us]
        has_prev = torch.from_numpy(prev >= 0).to(self.device).unsqueeze(-1)
        prev_dyn = self._dynamic("item", np.maximum(prev, 0)) * has_prev
        users_static = self._static_index(us, len(self.train_users))
        pred = self.model.predict(self.model.project(u_prev, du), users_static, prev_dyn,
                                  self._static_index(prev, len(self.train_items)))  # i~ (B, D+S)
        scores = None
        if columns is not None:
            with torch.no_grad():
                scores = M.neg_sq_distance(pred, self._targets(columns))  # (B, C)
        pos = M.neg_sq_distance(pred, self._targets(it).unsqueeze(1)).squeeze(1)  # (B,)
        negs = self.negatives((len(batch), self.config.num_negatives), 0, len(self.items.ids)).cpu().numpy()
        neg = M.neg_sq_distance(pred, self._targets(negs))  # (B, N)
        u_new, i_new = self.model.update(u_prev, i_prev, du, di)
        loss = (M.bpr_loss(pos, neg) + self.config.lambda_u * (u_new - u_prev).pow(2).sum(-1).mean()
                + self.config.lambda_i * (i_new - i_prev).pow(2).sum(-1).mean())
        self._write(batch, us, it, u_new, i_new)
        self.pending.append(loss)
        if len(self.pending) >= self.config.bptt_batches:
            self.flush()
        return scores, float(loss.detach())

    def _write(self, batch: EventBatch, us: np.ndarray, it: np.ndarray, u_new: torch.Tensor,
               i_new: torch.Tensor) -> None:
        """Latest event per user/item wins (out of place: gradients keep flowing through the state)."""
        uu, ul = last_occurrence(us)
        iu, il = last_occurrence(it)
        for state, unique, last, new in ((self.users, uu, ul, u_new), (self.items, iu, il, i_new)):
            state.dyn = state.dyn.index_put((torch.from_numpy(unique).to(self.device),),
                                            new[torch.from_numpy(last).to(self.device)])
            state.seen[unique], state.last[unique] = True, batch.timestamp[last]
        self.user_prev[uu] = it[ul]

    def flush(self) -> float:
        """SGD step on the open window's losses; the state is detached afterwards."""
        if not self.pending:
            return 0.0
        loss = torch.stack(self.pending).mean()
        self.sgd_step(loss)
        self.users.dyn, self.items.dyn = self.users.dyn.detach(), self.items.dyn.detach()
        self.pending = []
        return float(loss.detach())

    def train_epoch(self, train: pa.Table) -> float:
        self.model.train()
        self.reset_state()
        losses = [self._step(batch, None)[1] for batch in iter_batches(train, self.config.batch_size)]
        self.flush()
        return float(np.mean(losses)) if losses else 0.0

    def score_batch(self, batch: EventBatch, catalog: ItemCatalog) -> torch.Tensor:
        """Score, then learn from the batch (the paper's test-time updates of JODIE)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.test_time_lr or self.config.lr
        with torch.enable_grad():
            scores, _ = self._step(batch, catalog)
        assert scores is not None
        return scores
