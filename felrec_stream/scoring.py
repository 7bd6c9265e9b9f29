"""The served score, in one place: score(u, x) = cos(u, x) + w * log(1 + popularity(x)).

popularity = an item's interactions, each weighted by 0.5 ** (events since it / half-life)
(`cache.popularity_halflife`; 0 = plain counts); w = `scoring.popularity_weight`. The store keeps
popularity (`state.store.HistoryBuffer.popularity`), the query API ranks by it
(`serving.ranking`), the evaluator scores with it (`training/felrec_online.py`), and the
popularity baselines are its prior alone: all of them compute it with these functions, so what is
served is what was measured. Pure functions over numpy arrays and torch tensors (the result has
the input's kind and, for torch, its device).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def halflife_decay(steps: Array | float, halflife: float) -> Array:
    """Weight of an interaction `steps` events ago: 0.5 ** (steps / halflife), 1 when halflife is 0
    (float64; numpy for numbers and arrays)."""
    if isinstance(steps, torch.Tensor):
        t = steps.to(torch.float64)
        return 0.5 ** (t / halflife) if halflife else torch.ones_like(t)
    a = np.asarray(steps, dtype=np.float64)
    return 0.5 ** (a / halflife) if halflife else np.ones_like(a)  # type: ignore[return-value]


def log_popularity(popularity: Array) -> Array:
    """log(1 + popularity): the popularity prior before its weight."""
    if isinstance(popularity, torch.Tensor):
        return torch.log1p(popularity)
    return np.log1p(popularity)


def popularity_prior(popularity: Array, weight: float) -> Array:
    """w * log(1 + popularity): what the served score adds to the cosine."""
    return weight * log_popularity(popularity)


def with_prior(cosine: Array, log_pop: Array, weight: float) -> Array:
    """cosine + w * log_pop, from the prior's parts (`log_popularity`); a new array or tensor."""
    if isinstance(cosine, torch.Tensor):
        return cosine.add(log_pop, alpha=weight)
    return cosine + weight * log_pop


def served_score(cosine: Array, popularity: Array, weight: float) -> Array:
    """cos + w * log(1 + popularity): the score the query API ranks by and the evaluator scores."""
    return with_prior(cosine, log_popularity(popularity), weight)


def in_batch_popularity(base: np.ndarray, columns: torch.Tensor, halflife: float) -> torch.Tensor:
    """(B, C) float32 popularity of every catalog item just before each event of a batch.

    `base` (C,): popularity just before the batch; `columns` (B,): the catalog column of each
    event's item. Row i = base decayed by the i earlier events of the batch, plus decay(i - j) at
    column columns[j] for every earlier event j < i (the store's rule, exact per event).
    """
    steps = np.arange(len(columns))
    decay = torch.from_numpy(halflife_decay(steps, halflife).astype(np.float32))  # (B,)
    counts = torch.outer(decay, torch.from_numpy(np.asarray(base, dtype=np.float32))).to(columns.device)  # (B, C)
    earlier = np.tril(halflife_decay(steps[:, None] - steps[None, :], halflife), k=-1).astype(np.float32)  # j < i
    counts.index_add_(1, columns, torch.from_numpy(earlier).to(columns.device))
    return counts
