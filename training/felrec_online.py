"""OnlineModel adapters for the evaluator: FELRec (own vector or nearest neighbours) and popularity.

FELRec under eval protocol "serve" (the default, what a deployed system can do): event i of a batch
is scored with the user's vector as the store served it just before the event, against every item
vector as the store served it just before the event (vectors written by earlier events of the same
batch included, later ones never), then the batch is applied. An item's very first interaction
has no served vector: its column holds the item's no-history encoding (the evaluator reports these
events apart). A user without history is scored with its no-history encoding.

Under "paper" (the reference's protocol, for comparison): the event's user u and item x are encoded
from their histories and written first, then u is scored against the items as they are after the
event (but never vectors of later events of the batch).

Scores are cosine (or the nearest-neighbour mean, `nn_neighbors`) plus the popularity prior of
`ScoringConfig` (popularity before the event, earlier events of the batch included).

Evaluation modes: "keep" continues from the cache the model had at the end of training (the store
in the checkpoint); "reset" (same weights) and "zero-shot" (weights trained on another dataset)
start from an empty cache: the evaluator then replays the training and validation events unscored
before the test events, as the reference does.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from felrec_stream.config import EVAL_MODES, CacheConfig, ScoringConfig
from felrec_stream.device import release_freed_memory
from felrec_stream.errors import ModelError
from felrec_stream.model.felrec import FELRec
from felrec_stream.model.norms import adapting_norms
from felrec_stream.model.metrics import nearest_neighbour_queries
from felrec_stream.state.checkpoint import Checkpoint, model_from
from felrec_stream.parallel import Ranks
from felrec_stream.scoring import halflife_decay, in_batch_popularity, log_popularity, with_prior
from felrec_stream.state.engine import (BatchInputs, commit_batch, encode, encode_after, encode_sequences, infer_batch,
                                        prepare_batch, whole_after, whole_batch)
from felrec_stream.state.store import RepresentationStore
from felrec_stream.stream.events import EventBatch
from training.in_batch import previous_same, set_visible_scores, visible_updates, written_vectors
from training.protocol import EVAL_PARTITIONS, ItemCatalog

DEFAULT_SCORING = ScoringConfig()


class FELRecOnline:
    """FELRec as an OnlineModel: serves every partition (no embedding layer, no cold-start gap)."""

    partitions = frozenset(EVAL_PARTITIONS)

    def __init__(self, model: FELRec, store: RepresentationStore, cache_cfg: CacheConfig,
                 nn_neighbors: int | None = None, name: str | None = None, protocol: str = "serve",
                 scoring: ScoringConfig = DEFAULT_SCORING, ranks: Ranks | None = None,
                 query_model: FELRec | None = None) -> None:
        self.model, self.store, self.cache_cfg = model, store, cache_cfg
        # Prototype (benchmarks/check_query_encoder.py): users are served by this model's encoding of
        # their history before each event instead of their cached vector; the cache loop stays `model`'s.
        self.query_model = query_model
        self.ranks = ranks  # data-parallel: each rank encodes its slice of a batch, scores are replicated
        self.nn_neighbors, self.protocol, self.scoring = nn_neighbors, protocol, scoring
        self.mode = "keep"  # set by build_felrec: which events the evaluator replays first
        variant = f"FELRec-{model.config.variant.upper()}"
        self.name = name or (f"{variant}-NN" if nn_neighbors else variant)
        self._catalog: ItemCatalog | None = None
        self._slots = np.empty(0, dtype=np.int64)  # store item slot of each catalog position

    def score_batch(self, batch: EventBatch, catalog: ItemCatalog) -> torch.Tensor:
        """(B, C) scores, then the batch is applied to the store."""
        weight = self.scoring.popularity_weight
        similarity, prior = self.score_parts(batch, catalog, with_prior=weight != 0)
        return similarity if prior is None else with_prior(similarity, prior, weight)

    @torch.no_grad()
    def observe(self, batch: EventBatch) -> None:
        """Apply a batch without scoring it (warm-up replays)."""
        was_training = self.model.training
        self.model.eval()
        try:  # a cache rebuilt from empty (reset, zero-shot): running output statistics follow it
            with adapting_norms(self.model) if self.mode != "keep" else contextlib.nullcontext():
                infer_batch(self.model, self.store, batch, self.cache_cfg, self.ranks)
        finally:
            self.model.train(was_training)
        release_freed_memory()  # a replay of 24 paper-size batches otherwise kept ~0.4 GB of freed heap

    @torch.no_grad()
    def score_parts(self, batch: EventBatch, catalog: ItemCatalog,
                    with_prior: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C) similarity and (B, C) log(1 + popularity) of every catalog item before each event
        (None without `with_prior`); the batch is applied to the store afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self._score(batch, catalog, with_prior)
        finally:
            self.model.train(was_training)

    def _score(self, batch: EventBatch, catalog: ItemCatalog,
               with_prior: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        post = self.model.config.cache_update == "post_event"
        device = next(self.model.parameters()).device
        inputs = prepare_batch(self.store, batch, device, self.cache_cfg, after=post, ranks=self.ranks)
        u, x = whole_batch(self.ranks, inputs, *encode(self.model, inputs))  # (B, D) each: histories before each event
        after = whole_after(self.ranks, inputs, encode_after(self.model, inputs)) if post else None
        W_u, W_x = written_vectors(inputs, u, x, after)  # (B, D) what each event leaves in the store
        Q = self._queries(self._user_vectors(inputs, u, W_u), inputs)  # (B, D)
        slots = self._catalog_slots(catalog)
        items = self.store.items.vectors.get(torch.from_numpy(slots)).to(Q.device)  # (C, D) before the batch
        similarity = Q @ F.normalize(items, dim=-1).T  # (B, C)
        col = torch.from_numpy(catalog.index(batch.item)).to(Q.device)  # (B,)
        i, j = (torch.from_numpy(a).to(Q.device) for a in visible_updates(inputs.item_slots, self.protocol == "paper"))
        set_visible_scores(similarity, Q, W_x, i, j, col)  # items written earlier in the batch
        if self.protocol == "serve":  # an item's first interaction: its no-history encoding
            first = torch.from_numpy(np.flatnonzero(inputs.item_plan.event_length == 0)).to(Q.device)
            similarity[first, col[first]] = (Q[first] * F.normalize(x[first], dim=-1)).sum(-1)
        prior = self._prior(inputs, slots, col) if with_prior else None
        commit_batch(self.store, inputs, u, x, after)
        return similarity, prior

    def _user_vectors(self, inputs: BatchInputs, u: torch.Tensor, W_u: torch.Tensor) -> torch.Tensor:
        """paper: the encoding of the history before the event; serve: what the store served (the
        vector an earlier event of the batch wrote, else the stored one), and the no-history
        encoding for a user the store has never seen."""
        if self.protocol == "paper":
            return u
        if self.query_model is not None:  # the history before each event, earlier events of the batch included
            return encode_sequences(self.query_model.eval(), inputs.users_before)
        prev = torch.from_numpy(previous_same(inputs.user_slots)).to(u.device)  # (B,) -1 = none
        known = torch.from_numpy(self.store.users.history.counts[inputs.user_slots] > 0).to(u.device)
        stored = self.store.users.vectors.get(torch.from_numpy(inputs.user_slots)).to(u.device)  # (B, D)
        served = torch.where(known.unsqueeze(1), stored, u)
        return torch.where((prev >= 0).unsqueeze(1), W_u[prev.clamp(min=0)], served)

    def _queries(self, U: torch.Tensor, inputs: BatchInputs) -> torch.Tensor:
        """(B, D) unit user vectors, or the nearest-neighbour mean (pre-batch users as neighbours)."""
        if not self.nn_neighbors:
            return F.normalize(U, dim=-1)
        users = self.store.users.vectors.all().to(U.device)  # (U, D)
        return nearest_neighbour_queries(U, users, self.nn_neighbors, torch.from_numpy(inputs.user_slots))

    def _prior(self, inputs: BatchInputs, slots: np.ndarray, col: torch.Tensor) -> torch.Tensor:
        """(B, C) log(1 + popularity) of every catalog item just before each event (exact per event:
        earlier events of the batch counted, each weighted by the store's decay)."""
        history = self.store.items.history
        present = slots >= 0
        base = np.zeros(len(slots), dtype=np.float32)
        base[present] = history.popularity(slots[present])  # before the batch
        return log_popularity(in_batch_popularity(base, col, history.halflife))

    def _catalog_slots(self, catalog: ItemCatalog) -> np.ndarray:
        """(C,) store slots of the catalog items, extended incrementally as the catalog grows."""
        if catalog is not self._catalog:
            self._catalog, self._slots = catalog, np.empty(0, dtype=np.int64)
        known = len(self._slots)
        if len(catalog) > known:
            new = self.store.items.ids.lookup(catalog.ids[known:])
            self._slots = np.concatenate([self._slots, new])
        missing = np.flatnonzero(self._slots < 0)  # items the store has not met yet
        if len(missing):
            self._slots[missing] = self.store.items.ids.lookup([catalog.ids[i] for i in missing])
        return self._slots


class PopularityOnline:
    """Scores = interaction counts before each event (earlier events of the batch included).

    With `halflife` (events; 0 = plain counts, the paper's baseline) each interaction is weighted
    0.5 ** (events since it / halflife): recent popularity, the same prior FELRec's score adds."""

    partitions = frozenset(EVAL_PARTITIONS)

    def __init__(self, history: Iterable[pa.Table] = (), halflife: float = 0.0) -> None:
        self.halflife = halflife
        self.name = "Popularity" if not halflife else f"Popularity (half-life {halflife:g} events)"
        items = [item for table in history for item in table.column("item").to_pylist()]
        weights = halflife_decay(np.arange(len(items), 0, -1), halflife)  # the last history event is 1 event ago
        self._base: dict[str, float] = {}
        for item, weight in zip(items, weights):
            self._base[item] = self._base.get(item, 0.0) + float(weight)
        self._catalog: ItemCatalog | None = None
        self._counts = np.zeros(0, dtype=np.float64)  # per catalog position, just before the next event

    def score_batch(self, batch: EventBatch, catalog: ItemCatalog) -> torch.Tensor:
        if catalog is not self._catalog:
            self._catalog, self._counts = catalog, np.zeros(0, dtype=np.float64)
        known = len(self._counts)
        if len(catalog) > known:
            new = np.fromiter((self._base.get(i, 0.0) for i in catalog.ids[known:]), dtype=np.float64)
            self._counts = np.concatenate([self._counts, new])
        B, col = len(batch), catalog.index(batch.item)
        scores = in_batch_popularity(self._counts, torch.from_numpy(col), self.halflife)  # (B, C)
        self._counts *= halflife_decay(B, self.halflife)
        np.add.at(self._counts, col, halflife_decay(B - np.arange(B), self.halflife))
        return scores


def build_felrec(checkpoint: Checkpoint, mode: str = "keep", device: torch.device | str = "cpu",
                 nn_neighbors: int | None = None, protocol: str | None = None,
                 ranks: Ranks | None = None) -> FELRecOnline:
    """A FELRecOnline from a checkpoint: weights and scoring always; the training cache only in
    "keep" mode. protocol defaults to the checkpoint's eval config. With data-parallel `ranks`
    each rank encodes its slice of every batch (the model is in eval mode: no statistics to sync)."""
    if mode not in EVAL_MODES:
        raise ModelError(f"evaluation mode must be one of {', '.join(EVAL_MODES)}, got {mode!r}")
    cfg = checkpoint.configs
    model = model_from(checkpoint, device)
    store = RepresentationStore.for_cache(cfg.encoder.d_model, cfg.cache, device)
    if mode == "keep":
        if checkpoint.store_state is None:
            raise ModelError("this checkpoint holds no cache: evaluate it with --mode reset or zero-shot")
        store.load_state_dict(checkpoint.store_state)
    online = FELRecOnline(model, store, cfg.cache, nn_neighbors, protocol=protocol or cfg.eval.protocol,
                          scoring=cfg.scoring, ranks=ranks)
    online.name = f"{online.name} ({mode})"
    online.mode = mode
    return online
