"""The contract between the online evaluator and every model it evaluates (FELRec, baselines).

The evaluator replays events in time order in micro-batches. For each batch it first adds the
batch's new items to the `ItemCatalog` (items seen so far, in order of first appearance: catalog
index = position), then asks the model for scores of every event's user against the whole
catalog. The model may update its state from the batch *as the paper's protocol does* (FELRec
encodes u and x from their histories, which never include the event itself, then writes them);
it must never let an event's own outcome raise that event's true item (e.g. popularity counts
are taken before the batch is counted).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from felrec_stream.stream.events import EventBatch

PARTITIONS = ("observed", "new_user", "new_item")


class ItemCatalog:
    """The evaluator's items seen so far; grows as batches arrive (not the query API's CatalogInfo)."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self.ids: list[str] = []

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, items: np.ndarray) -> None:
        for item in items:
            if item not in self._index:
                self._index[item] = len(self.ids)
                self.ids.append(item)

    def index(self, items: np.ndarray) -> np.ndarray:
        """Catalog positions of `items` (all must have been added)."""
        return np.fromiter((self._index[i] for i in items), dtype=np.int64, count=len(items))

    def __contains__(self, item: str) -> bool:
        return item in self._index


@runtime_checkable
class OnlineModel(Protocol):
    """A model as the online evaluator sees it."""

    name: str
    # Partitions it can serve; the report shows a dash for the others (never a made-up number).
    partitions: frozenset[str]

    def score_batch(self, batch: EventBatch, catalog: ItemCatalog) -> torch.Tensor:
        """(B, len(catalog)) scores of each event's user against every catalog item (higher = better)."""
        ...
