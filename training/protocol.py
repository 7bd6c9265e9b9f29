"""The contract between the online evaluator and every model it evaluates (FELRec, baselines).

The evaluator replays events in time order in micro-batches. For each batch it first adds the
batch's new items to the `ItemCatalog` (items seen so far, in order of first appearance: catalog
index = position), then asks the model for scores of every event's user against the whole
catalog, then the model applies the batch to its state.

Row i of the scores must be what the model would have served just before event i (eval protocol
"serve"): it may depend on every earlier event, including earlier events of the same batch, and
on nothing from event i or later. Only columns below the row's catalog size count (items met
before event i, plus event i's own item); for an item's very first interaction the own column
holds the model's score for an item with no interactions (-inf if it cannot represent one). So
the scores of the first k events of a batch never change when later events are removed, and
batching is an implementation detail (tests/training/test_protocol.py checks every model).
FELRec also implements the reference's "paper" protocol for comparison (training/felrec_online.py).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from felrec_stream.data.split import PARTITIONS
from felrec_stream.stream.events import EventBatch

# The rows of every report: the cold-start partitions of `data.split.label_partitions`, plus an
# item's very first interaction, which under "serve" nobody can rank (the item does not exist yet).
EVAL_PARTITIONS = (*PARTITIONS, "first_item")


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
