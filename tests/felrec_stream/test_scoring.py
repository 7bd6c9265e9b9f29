"""The served score's functions agree over numpy and torch, and with the store's popularity."""

from __future__ import annotations

import numpy as np
import torch

from felrec_stream.scoring import (halflife_decay, in_batch_popularity, log_popularity, popularity_prior,
                                   served_score, with_prior)
from felrec_stream.state.store import HistoryBuffer


def test_numpy_and_torch_agree():
    steps = np.array([0, 1, 3, 10])
    np.testing.assert_allclose(halflife_decay(steps, 2.0), [1.0, 0.5 ** 0.5, 0.5 ** 1.5, 0.5 ** 5])
    assert torch.equal(halflife_decay(torch.from_numpy(steps), 2.0), torch.from_numpy(halflife_decay(steps, 2.0)))
    np.testing.assert_array_equal(halflife_decay(steps, 0.0), np.ones(4))
    pop, cos = np.array([0.0, 1.0, 9.5]), np.array([0.1, -0.2, 0.3])
    np.testing.assert_allclose(served_score(cos, pop, 0.5), cos + 0.5 * np.log(1 + pop))
    np.testing.assert_allclose(popularity_prior(pop, 0.5), served_score(np.zeros(3), pop, 0.5))
    np.testing.assert_allclose(served_score(torch.from_numpy(cos), torch.from_numpy(pop), 0.5).numpy(),
                               served_score(cos, pop, 0.5))
    np.testing.assert_allclose(with_prior(cos, log_popularity(pop), 0.5), served_score(cos, pop, 0.5))


def test_in_batch_popularity_is_the_stores_popularity_before_each_event():
    """Row i = what HistoryBuffer.popularity says just before event i of the batch (exact per event)."""
    rng = np.random.default_rng(0)
    history = HistoryBuffer(4, halflife=3.0)
    before = rng.integers(0, 6, 20)
    history.apply(history.plan(before, before), slots=before)
    batch = rng.integers(0, 6, 9)
    rows = in_batch_popularity(history.popularity(np.arange(6)), torch.from_numpy(batch), history.halflife)
    for i, slot in enumerate(batch):
        np.testing.assert_allclose(rows[i].numpy(), history.popularity(np.arange(6)), rtol=1e-6, err_msg=str(i))
        history.apply(history.plan(np.array([slot]), np.array([slot])), slots=np.array([slot]))
