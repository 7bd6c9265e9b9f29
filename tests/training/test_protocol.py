"""The evaluation protocol: batching is an implementation detail, "serve" scores before applying.

Every OnlineModel must score event i of a batch with what it knew just before event i (earlier
events of the same batch included): removing later events of the batch never changes the scores
of the earlier ones. FELRec's two protocols are checked against their definitions replayed by hand:
"serve" = what the store serves after applying the events before i; "paper" = apply event i, then
score.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from felrec_stream.config import CacheConfig, EncoderConfig, ModelConfig, ScoringConfig
from felrec_stream.data.synthetic import SyntheticConfig, generate
from felrec_stream.model.felrec import FELRec
from felrec_stream.state.engine import encode, infer_batch, prepare_batch
from felrec_stream.state.store import RepresentationStore
from felrec_stream.stream.events import EventBatch, iter_batches
from training.baselines import BASELINES, build_baseline, make_config
from training.baselines.configs import CooccurrenceConfig
from training.baselines.cooccurrence import CooccurrenceOnline
from training.evaluate import catalog_sizes
from training.felrec_online import FELRecOnline, PopularityOnline
from training.protocol import ItemCatalog

ENC = EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0)
FELREC_SETUPS = {
    "pre-serve": (ModelConfig(queue_size=32), {}),
    "post-serve": (ModelConfig(queue_size=32, cache_update="post_event"), {}),
    "post-serve-nn": (ModelConfig(queue_size=32, cache_update="post_event"), {"nn_neighbors": 3}),
    "post-serve-prior": (ModelConfig(queue_size=32, cache_update="post_event"),
                         {"scoring": ScoringConfig(popularity_weight=0.3)}),
    "pre-paper": (ModelConfig(queue_size=32), {"protocol": "paper"}),
    "post-paper": (ModelConfig(queue_size=32, cache_update="post_event"), {"protocol": "paper"}),
}
COOCCURRENCE = CooccurrenceConfig(window=3, history=8, halflife=2.0, prior_weight=0.2, prior_halflife=40.0)


@pytest.fixture(scope="module")
def stream():
    events = generate(SyntheticConfig(n_users=60, n_items=40, n_events=700, seed=1)).events
    return events.slice(0, 600), EventBatch.from_table(events.slice(600, 48))


def _felrec(train, setup: str, halflife: float = 0.0) -> FELRecOnline:
    model_cfg, options = FELREC_SETUPS[setup]
    torch.manual_seed(0)
    model = FELRec(ENC, model_cfg).eval()
    cache = CacheConfig(history_len=8, popularity_halflife=halflife)
    store = RepresentationStore.for_cache(16, cache)
    for batch in iter_batches(train, 64):
        infer_batch(model, store, batch, cache)
    return FELRecOnline(model, store, cache, **options)


def _models(train):
    models = {f"felrec-{name}": (lambda name=name: _felrec(train, name)) for name in FELREC_SETUPS}
    models["felrec-decayed-prior"] = lambda: _felrec(train, "post-serve-prior", halflife=40.0)
    models["popularity"] = lambda: PopularityOnline([train])
    models["popularity-recent"] = lambda: PopularityOnline([train], halflife=40.0)
    models["cooccurrence"] = lambda: CooccurrenceOnline(COOCCURRENCE, [train])
    for name in BASELINES:
        models[name] = lambda name=name: _warm(build_baseline(name, make_config(name, "tiny"), train), train)
    return models


def _warm(model, train):
    """Replay the training events through the model's online path (its state then holds them)."""
    catalog = _catalog(train)
    for batch in iter_batches(train, 64):
        catalog.add(batch.item)
        model.score_batch(batch, catalog)
    if hasattr(model, "flush"):  # JODIE*: end its open gradient window (its state can then be copied)
        model.flush()
    return model


def _catalog(train, items=()) -> ItemCatalog:
    catalog = ItemCatalog()
    catalog.add(np.asarray(train.column("item").to_pylist(), dtype=object))
    catalog.add(np.asarray(items, dtype=object))
    return catalog


MODEL_NAMES = [f"felrec-{n}" for n in FELREC_SETUPS] + ["felrec-decayed-prior", "popularity", "popularity-recent",
                                                         "cooccurrence", *BASELINES]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_scores_of_earlier_events_do_not_depend_on_later_events(stream, name):
    train, batch = stream
    model = _models(train)[name]()
    catalog = _catalog(train)
    sizes = catalog_sizes(catalog, batch.item)
    full = copy.deepcopy(model).score_batch(batch, catalog)
    for k in (1, 9, 30):
        part = copy.deepcopy(model).score_batch(batch.take(slice(0, k)), _catalog(train, batch.item[:k]))
        for i in range(k):
            torch.testing.assert_close(part[i, : sizes[i]], full[i, : sizes[i]], rtol=1e-5, atol=1e-5,
                                       msg=f"{name}: event {i} changed when the batch was cut after {k}")


def _replayed_scores(train, setup, batch, i, apply_own: bool) -> torch.Tensor:
    """Scores of event i by definition: a fresh copy of the pre-batch store applies events [0, i)
    (serve) or [0, i] (paper) as one batch, then the user's stored vector is compared with every
    item's stored vector."""
    online = _felrec(train, setup)
    store, model, cache = online.store, online.model, online.cache_cfg
    stop = i + 1 if apply_own else i
    if stop:
        infer_batch(model, store, batch.take(slice(0, stop)), cache)
    catalog = _catalog(train, batch.item[: i + 1])
    items = store.items.vectors.get(torch.from_numpy(store.items.ids.lookup(catalog.ids)))  # (C, D)
    user = store.users.vectors.get(torch.from_numpy(store.users.ids.lookup([batch.user[i]])))  # (1, D)
    item_slot = store.items.ids.lookup([batch.item[i]])[0]
    own_first = item_slot < 0 or store.items.history.counts[item_slot] == 0
    probe = prepare_batch(store, batch.take(slice(i, i + 1)), "cpu", cache)
    u, x = encode(model, probe)
    if user.abs().sum() == 0 or store.users.history.counts[store.users.ids.lookup([batch.user[i]])[0]] == 0:
        user = u  # a user never served before: its no-history encoding
    if own_first and not apply_own:
        items[catalog.index(np.asarray([batch.item[i]], dtype=object))[0]] = x[0]  # no-history encoding
    return (F.normalize(user, dim=-1) @ F.normalize(items, dim=-1).T)[0]


@pytest.mark.parametrize("setup", ["pre-serve", "post-serve", "pre-paper"])
def test_felrec_protocols_equal_their_definitions(stream, setup):
    """serve: score with what the store holds after the events before i; paper (pre_event cache):
    apply event i, then score with the stored vectors."""
    train, batch = stream
    batch = batch.take(slice(0, 24))
    online = _felrec(train, setup)
    catalog = _catalog(train)
    sizes = catalog_sizes(catalog, batch.item)
    scores = online.score_batch(batch, catalog)
    for i in range(len(batch)):
        expected = _replayed_scores(train, setup, batch, i, apply_own=setup.endswith("paper"))
        torch.testing.assert_close(scores[i, : sizes[i]], expected[: sizes[i]], rtol=1e-4, atol=1e-5,
                                   msg=f"{setup}: event {i}")


def test_popularity_prior_is_the_decayed_count_before_each_event(stream):
    train, batch = stream
    online = _felrec(train, "post-serve", halflife=40.0)
    catalog = _catalog(train)
    catalog_sizes(catalog, batch.item)
    similarity, prior = copy.deepcopy(online).score_parts(batch, catalog)
    recent = PopularityOnline([train], halflife=40.0).score_batch(batch, catalog)  # the baseline counts alike
    torch.testing.assert_close(prior, torch.log1p(recent), rtol=1e-4, atol=1e-5)
    items = train.column("item").to_pylist() + list(batch.item)
    n_train = len(train)
    for i in (0, 5, 47):
        now = n_train + i  # index of event i in the whole replay
        expected = np.zeros(len(catalog))
        for position, item in enumerate(items[:now]):
            expected[catalog.index(np.asarray([item], dtype=object))[0]] += 0.5 ** ((now - position) / 40.0)
        np.testing.assert_allclose(prior[i].numpy(), np.log1p(expected), rtol=1e-4, atol=1e-5)
    weighted = FELRecOnline(online.model, copy.deepcopy(online.store), online.cache_cfg,
                            scoring=ScoringConfig(popularity_weight=0.5))
    torch.testing.assert_close(weighted.score_batch(batch, catalog), similarity + 0.5 * prior)
