"""OnlineModel adapters for the evaluator: FELRec (own vector or nearest neighbours) and popularity.

FELRec scores a batch the way the streaming worker serves it: `engine.infer_batch` encodes every
event's user u and item x from their cached histories (which never contain the event itself) and
writes them back; u is then compared by cosine with the cached vectors of every catalog item.
Evaluation modes (`config.EVAL_MODES`):

- "keep": continue from the cache the model had at the end of training (store from the checkpoint);
- "reset": same weights, empty cache (every entity starts cold);
- "zero-shot": weights trained on *another* dataset, empty cache (same mechanics as reset).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from felrec_stream.config import EVAL_MODES, CacheConfig
from felrec_stream.errors import ModelError
from felrec_stream.model.felrec import FELRec
from felrec_stream.model.ranking import cosine_scores, nearest_neighbour_scores
from felrec_stream.state.checkpoint import Checkpoint
from felrec_stream.state.engine import infer_batch
from felrec_stream.state.store import RepresentationStore
from felrec_stream.stream.events import EventBatch
from training.protocol import PARTITIONS, ItemCatalog


class FELRecOnline:
    """FELRec as an OnlineModel: serves every partition (no embedding layer, no cold-start gap)."""

    partitions = frozenset(PARTITIONS)

    def __init__(self, model: FELRec, store: RepresentationStore, cache_cfg: CacheConfig,
                 nn_neighbors: int | None = None, name: str | None = None) -> None:
        self.model, self.store, self.cache_cfg = model, store, cache_cfg
        self.nn_neighbors = nn_neighbors
        variant = f"FELRec-{model.config.variant.upper()}"
        self.name = name or (f"{variant}-NN" if nn_neighbors else variant)
        self._catalog: ItemCatalog | None = None
        self._slots = np.empty(0, dtype=np.int64)  # store item slot of each catalog position

    def score_batch(self, batch: EventBatch, catalog: ItemCatalog) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            inputs, u, _ = infer_batch(self.model, self.store, batch, self.cache_cfg)
        finally:
            self.model.train(was_training)
        slots = torch.from_numpy(self._catalog_slots(catalog))
        items = self.store.items.vectors.get(slots).to(u.device)  # (C, D), zero for unknown items
        if not self.nn_neighbors:
            return cosine_scores(u, items)  # (B, C)
        users = self.store.users.vectors.all().to(u.device)  # (U, D)
        return nearest_neighbour_scores(u, users, items, self.nn_neighbors,
                                        self_index=torch.from_numpy(inputs.user_slots))

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
    """Scores = interaction counts so far; the batch is counted only *after* it was scored."""

    name = "Popularity"
    partitions = frozenset(PARTITIONS)

    def __init__(self, history: Iterable[pa.Table] = ()) -> None:
        self._base: dict[str, int] = {}
        for table in history:
            counts = pc.value_counts(table.column("item"))
            for item, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
                self._base[item] = self._base.get(item, 0) + n
        self._catalog: ItemCatalog | None = None
        self._counts = np.zeros(0, dtype=np.float32)  # per catalog position

    def score_batch(self, batch: EventBatch, catalog: ItemCatalog) -> torch.Tensor:
        if catalog is not self._catalog:
            self._catalog, self._counts = catalog, np.zeros(0, dtype=np.float32)
        known = len(self._counts)
        if len(catalog) > known:
            new = np.fromiter((self._base.get(i, 0) for i in catalog.ids[known:]), dtype=np.float32)
            self._counts = np.concatenate([self._counts, new])
        scores = torch.from_numpy(self._counts.copy()).expand(len(batch), -1)  # (B, C)
        np.add.at(self._counts, catalog.index(batch.item), 1.0)
        return scores


def build_felrec(checkpoint: Checkpoint, mode: str = "keep", device: torch.device | str = "cpu",
                 nn_neighbors: int | None = None) -> FELRecOnline:
    """A FELRecOnline from a checkpoint: weights always; the training cache only in "keep" mode."""
    if mode not in EVAL_MODES:
        raise ModelError(f"evaluation mode must be one of {', '.join(EVAL_MODES)}, got {mode!r}")
    cfg = checkpoint.configs
    model = FELRec(cfg.encoder, cfg.model)
    model.load_state_dict(checkpoint.model_state)
    model.to(device).eval()
    store = RepresentationStore(cfg.encoder.d_model, cfg.cache.history_len, device=device)
    if mode == "keep":
        if checkpoint.store_state is None:
            raise ModelError("this checkpoint holds no cache: evaluate it with --mode reset or zero-shot")
        store.load_state_dict(checkpoint.store_state)
    online = FELRecOnline(model, store, cfg.cache, nn_neighbors)
    online.name = f"{online.name} ({mode})"
    return online
