"""Chronological train/validation/test split and the cold-start partitions of evaluation events.

Why chronological: a streaming recommender only ever sees the past, so evaluation must use events
that happen after everything it was trained on (paper section 4: 80/10/10 by time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from felrec_stream.errors import DatasetError
from felrec_stream.stream.events import is_time_ordered, sort_events, validate_events

PARTITIONS = ("observed", "new_user", "new_item")


@dataclass(frozen=True)
class Split:
    """Consecutive, time-ordered parts of one event table (train, then val, then test)."""

    train: pa.Table
    val: pa.Table
    test: pa.Table

    @property
    def sizes(self) -> tuple[int, int, int]:
        return len(self.train), len(self.val), len(self.test)


def split_sizes(n: int, val_fraction: float = 0.1, test_fraction: float = 0.1) -> tuple[int, int, int]:
    """(n_train, n_val, n_test): n_train = round(n * (1 - v - t)), n_val = round(n * v), test gets
    the rest. Halves round up (not to even), so the sizes do not depend on float noise."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError(f"val/test fractions must be in (0, 1) and sum below 1, got {val_fraction}, {test_fraction}")
    n_train = _round_half_up(n * (1.0 - val_fraction - test_fraction))
    n_val = _round_half_up(n * val_fraction)
    n_test = n - n_train - n_val
    if min(n_train, n_val, n_test) <= 0:
        raise DatasetError(f"cannot split {n} events into train/val/test = {n_train}/{n_val}/{n_test}: "
                           f"every part needs at least one event")
    return n_train, n_val, n_test


def _round_half_up(x: float) -> int:
    return int(math.floor(round(x, 9) + 0.5))


def chronological_split(table: pa.Table, val_fraction: float = 0.1, test_fraction: float = 0.1) -> Split:
    """Split events by *position* in (timestamp, event_id) order: the first n_train events are
    train, the next n_val validation, the rest test (sizes from `split_sizes`).

    Events sharing a timestamp across a boundary are split by position too (event_id order), so the
    sizes are exact and no part can be emptied by a large tie. An unsorted table is sorted first.
    """
    validate_events(table)
    if not is_time_ordered(table):
        table = sort_events(table)
    n_train, n_val, _ = split_sizes(len(table), val_fraction, test_fraction)
    return Split(
        train=table.slice(0, n_train),
        val=table.slice(n_train, n_val),
        test=table.slice(n_train + n_val),
    )


def label_partitions(train: pa.Table, events: pa.Table) -> np.ndarray:
    """Cold-start partition of each event of `events`, relative to the *training* events only.

    Rule (checked in this order):
      - "new_item" if the event's item never occurs in `train`, whatever the user;
      - "new_user" if the item occurs in train but the user never does;
      - "observed" if both the user and the item occur in train.
    Entities first seen in validation stay "new" in test too: the model never trained on them.
    Returns a numpy str array aligned with `events`.
    """
    known_items = pc.unique(train.column("item"))
    known_users = pc.unique(train.column("user"))
    new_item = ~pc.is_in(events.column("item"), value_set=known_items).to_numpy(zero_copy_only=False)
    new_user = ~pc.is_in(events.column("user"), value_set=known_users).to_numpy(zero_copy_only=False)
    codes = np.where(new_item, 2, np.where(new_user, 1, 0))
    return np.asarray(PARTITIONS)[codes]
