"""The co-occurrence (item-kNN) baseline against its definition, replayed one event at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from felrec_stream.data.synthetic import SyntheticConfig, generate
from felrec_stream.stream.events import EventBatch, iter_batches, make_events
from training.baselines.configs import CooccurrenceConfig
from training.baselines.cooccurrence import CooccurrenceOnline
from training.protocol import ItemCatalog


@pytest.fixture(scope="module")
def stream():
    events = generate(SyntheticConfig(n_users=12, n_items=20, n_events=260, seed=2)).events
    return events.slice(0, 150), events.slice(150)


def _definition(pairs, user, window, history, halflife, prior_weight, prior_halflife, items):
    """Scores of `items` for `user` after the (user, item) events `pairs`, straight from the docstring."""
    sequences: dict[str, list[str]] = {}
    counts: dict[tuple[str, str], int] = {}
    for u, x in pairs:
        seq = sequences.setdefault(u, [])
        for j in seq[-window:]:
            if j != x:
                counts[x, j] = counts.get((x, j), 0) + 1
                counts[j, x] = counts.get((j, x), 0) + 1
        seq.append(x)
    last = sequences.get(user, [])[::-1][:history]
    n = len(pairs)
    out = []
    for i in items:
        score = sum((0.5 ** (p / halflife) if halflife else 1.0) * math.log1p(counts.get((j, i), 0))
                    for p, j in enumerate(last))
        popularity = sum((0.5 ** ((n - k) / prior_halflife) if prior_halflife else 1.0)
                         for k, (_, x) in enumerate(pairs) if x == i)
        out.append(score + prior_weight * math.log1p(popularity))
    return out


@pytest.mark.parametrize("config", [CooccurrenceConfig(window=1, history=4, halflife=0.0),
                                    CooccurrenceConfig(window=3, history=2, halflife=1.0, prior_weight=0.3,
                                                       prior_halflife=20.0),
                                    CooccurrenceConfig(window=10, history=16, halflife=4.0, max_dense_items=5)])
def test_scores_equal_the_definition_event_by_event(stream, config):
    """Batch 16 (earlier events of a batch count), a dense and a sparse (max_dense_items=5) count."""
    train, test = stream
    model = CooccurrenceOnline(config, [train])
    catalog = ItemCatalog()
    catalog.add(np.asarray(train.column("item").to_pylist(), dtype=object))
    pairs = list(zip(train.column("user").to_pylist(), train.column("item").to_pylist()))
    for batch in iter_batches(test, 16):
        catalog.add(batch.item)
        scores = model.score_batch(batch, catalog)
        for i, (u, x) in enumerate(zip(batch.user, batch.item)):
            expected = _definition(pairs, u, config.window, config.history, config.halflife, config.prior_weight,
                                   config.prior_halflife, catalog.ids)
            torch.testing.assert_close(scores[i], torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-4)
            pairs.append((u, x))


def test_new_items_score_zero_until_they_co_occur_and_new_users_get_the_prior():
    model = CooccurrenceOnline(CooccurrenceConfig(window=2, history=4, prior_weight=1.0))
    catalog = ItemCatalog()
    batch = EventBatch.from_table(make_events(["a", "a", "b"], ["x", "y", "x"], np.arange(3)))
    catalog.add(batch.item)
    scores = model.score_batch(batch, catalog)
    assert scores[0].tolist() == [0.0, 0.0]  # nothing met yet
    assert scores[1].tolist() == pytest.approx([math.log(2), 0.0])  # y is new: no co-occurrence, no popularity
    assert scores[2].tolist() == pytest.approx([math.log(2), math.log(2)])  # new user b: the prior alone

