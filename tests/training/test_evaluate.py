import copy
import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from felrec_stream.config import CacheConfig, Configs, EncoderConfig, EvalConfig, ModelConfig, ScoringConfig
from felrec_stream.data.synthetic import SyntheticConfig, generate
from felrec_stream.model.felrec import FELRec
from felrec_stream.serving.query import QueryEngine
from felrec_stream.state.engine import infer_batch
from felrec_stream.state.store import RepresentationStore
from felrec_stream.stream.events import EventBatch, iter_batches, make_events
from training.evaluate import RecentItems, evaluate, item_prior_interactions, log_binned_means
from training.felrec_online import FELRecOnline, PopularityOnline
from training.protocol import EVAL_PARTITIONS, ItemCatalog, OnlineModel
from training.report import table1_markdown


def _score(user: str, item: str) -> float:
    """A fixed pseudo-random score in {0, ..., 3}: many ties."""
    return float(hashlib.md5(f"{user}|{item}".encode()).digest()[0] % 4)


class HashModel:
    def __init__(self, partitions=frozenset(EVAL_PARTITIONS), name="hash"):
        self.name, self.partitions = name, frozenset(partitions)
        self.seen: list[list[str]] = []

    def score_batch(self, batch: EventBatch, catalog: ItemCatalog) -> torch.Tensor:
        self.seen.append(list(batch.item))
        return torch.tensor([[_score(u, i) for i in catalog.ids] for u in batch.user])


def _tables():
    rng = np.random.default_rng(3)
    users = [f"u{k}" for k in rng.integers(0, 6, 40)]
    items = [f"i{k}" for k in rng.integers(0, 12, 40)]
    items[30] = items[33] = "brand-new"  # first met in the test events, at event 30 (its first interaction)
    table = make_events(users, items, np.arange(40) // 2)  # timestamp ties, ordered by event_id
    return table.slice(0, 20), table.slice(20, 6), table.slice(26)


def _brute_force(train, warmup, events, score, recent: int = 0):
    """Per event (rank, hit with every other non-excluded catalog item as negative, partition, prior
    count), one event at a time: the catalog holds the items met before the event plus its own; the
    items of the user's last `recent` interactions before the event score -inf."""
    train_items, train_users = set(train.column("item").to_pylist()), set(train.column("user").to_pylist())
    history = train.column("item").to_pylist() + warmup.column("item").to_pylist()
    pairs = list(zip(train.column("user").to_pylist() + warmup.column("user").to_pylist(), history))
    users, items = events.column("user").to_pylist(), events.column("item").to_pylist()
    out = []
    for n, (u, i) in enumerate(zip(users, items)):
        catalog = set(history) | set(items[: n + 1])
        seen = [j for v, j in pairs + list(zip(users[:n], items[:n])) if v == u]
        excluded = set(seen[len(seen) - recent:]) if recent else set()

        def s(v, j, n=n, excluded=excluded):
            return float("-inf") if j in excluded else score(n)(v, j)

        others = [(s(u, j), j in excluded) for j in catalog if j != i]
        true = s(u, i)
        rank = (sum(o > true for o, _ in others) + 0.5 * sum(o == true for o, _ in others)) / max(len(others), 1)
        negatives = [o for o, out_ in others if not out_]
        hit = sum(o > true for o in negatives) + 0.5 * sum(o == true for o in negatives) < 3
        prior = history.count(i) + items[:n].count(i)
        part = ("first_item" if prior == 0 else "new_item" if i not in train_items else
                "new_user" if u not in train_users else "observed")
        out.append((rank, hit, part, prior))
    return out


@pytest.mark.parametrize("recent", [0, 2, 64])
def test_evaluator_matches_brute_force(recent):
    """With and without the already-seen rule (2: only part of a user's history is excluded)."""
    train, warmup, test = _tables()
    cfg = EvalConfig(batch_size=4, num_negatives=1000, hr_k=3)
    model = HashModel()
    result = evaluate(model, test, train, cfg, warmup=warmup, exclude_recent=recent)
    assert result.summary()["exclude_recent"] == recent
    expected = _brute_force(train, warmup, test, lambda n: _score, recent)
    if recent:
        assert expected != _brute_force(train, warmup, test, lambda n: _score), "the rule must matter on this stream"
    assert isinstance(model, OnlineModel)
    assert model.seen[:2] == [warmup.column("item").to_pylist()[:4], warmup.column("item").to_pylist()[4:]]
    t = result.events
    np.testing.assert_allclose(t.column("rank").to_numpy(), [e[0] for e in expected])
    assert t.column("hit").to_pylist() == [e[1] for e in expected]
    assert t.column("partition").to_pylist() == [e[2] for e in expected]
    assert t.column("item_prior_interactions").to_pylist() == [e[3] for e in expected]
    assert t.column("event_id").to_pylist() == test.column("event_id").to_pylist()
    summary = result.summary()
    servable = [e[0] for e in expected if e[2] != "first_item"]  # serve: an item's first interaction is not totalled
    assert 0 < len(servable) < len(expected)
    assert summary["total"]["rank"] == pytest.approx(np.mean(servable))
    assert summary["partitions"]["first_item"]["count"] == len(expected) - len(servable)
    assert sum(p["share"] for p in summary["partitions"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("recent", [0, 64])
def test_popularity_counts_every_earlier_event(recent):
    train, warmup, test = _tables()
    cfg = EvalConfig(batch_size=4, num_negatives=1000, hr_k=3)
    result = evaluate(PopularityOnline([train]), test, train, cfg, warmup=warmup, exclude_recent=recent)
    history = train.column("item").to_pylist() + warmup.column("item").to_pylist()
    items = test.column("item").to_pylist()

    def scorer(n):
        seen = history + items[:n]  # earlier events of the same batch count, the event itself not
        return lambda u, i: float(seen.count(i))

    expected = _brute_force(train, warmup, test, scorer, recent)
    np.testing.assert_allclose(result.events.column("rank").to_numpy(), [e[0] for e in expected])


def test_already_seen_rule_is_batch_invariant():
    """Batch size 1 and 7 exclude the same items of each event (earlier events of the batch count)."""
    events = generate(SyntheticConfig(n_users=15, n_items=30, n_events=400, seed=4)).events
    train, warmup, test = events.slice(0, 250), events.slice(250, 50), events.slice(300)
    ranks = [evaluate(PopularityOnline([train], halflife=30.0), test, train, EvalConfig(batch_size=b), warmup,
                      exclude_recent=5).events.column("rank").to_numpy() for b in (1, 7)]
    np.testing.assert_allclose(ranks[0], ranks[1])
    plain = evaluate(PopularityOnline([train], halflife=30.0), test, train, EvalConfig(batch_size=7), warmup,
                     exclude_recent=0).events.column("rank").to_numpy()
    assert not np.allclose(plain, ranks[1])


def test_query_api_and_evaluator_exclude_the_same_items():
    """The items the query API leaves out of a user's recommendations by default (its store's
    last-L history) are the ones the evaluator scores -inf for the user's next event."""
    model, _ = _tiny_felrec()
    model.eval()
    cache = CacheConfig(history_len=4)
    events = generate(SyntheticConfig(n_users=12, n_items=25, n_events=300, seed=5)).events
    store = RepresentationStore.for_cache(16, cache)
    catalog, recent = ItemCatalog(), RecentItems(Configs(cache=cache).excluded_recent)
    for batch in iter_batches(events, 32):
        infer_batch(model, store, batch, cache)
        catalog.add(batch.item)
        recent.before(batch, catalog)
    engine = QueryEngine(store, scoring=ScoringConfig())
    users = sorted(set(events.column("user").to_pylist()))
    probe = EventBatch.from_table(make_events(users, [catalog.ids[0]] * len(users), [10**6] * len(users)))
    excluded = recent.before(probe, catalog)  # (U, L): before each user's next event
    n_items = len(store.items.ids)
    for user, row in zip(users, excluded):
        everything = {r.id for r in engine.recommend(user, k=n_items, exclude_recent=False).results}
        served = {r.id for r in engine.recommend(user, k=n_items).results}  # the default: scoring.exclude_recent
        assert everything - served == {catalog.ids[j] for j in row if j >= 0}, user
    off = QueryEngine(store, scoring=ScoringConfig(exclude_recent=False))
    assert len(off.recommend(users[0], k=n_items).results) == n_items


@pytest.mark.parametrize("halflife", [0.0, 40.0])
def test_query_api_and_evaluator_give_the_same_scores(halflife):
    """Over the same store state, the score the query API ranks a user's items by (cosine + w *
    log(1 + popularity), `felrec_stream.scoring`) is the score the evaluator gives them for the
    user's next event: same items, same numbers (float32 vs float64 apart)."""
    model, _ = _tiny_felrec()
    model.eval()
    cache, scoring = CacheConfig(history_len=4, popularity_halflife=halflife), ScoringConfig(popularity_weight=0.7)
    events = generate(SyntheticConfig(n_users=10, n_items=20, n_events=240, seed=6)).events
    online = FELRecOnline(model, RepresentationStore.for_cache(16, cache), cache, scoring=scoring)
    for batch in iter_batches(events, 32):
        online.observe(batch)
    store = online.store
    engine = QueryEngine(store, scoring=scoring)
    catalog = ItemCatalog()
    catalog.add(np.asarray(store.items.ids.ids(), dtype=object))
    assert store.items.history.pop.any() and scoring.popularity_weight
    for user in sorted(set(events.column("user").to_pylist())):
        served = {r.id: r.score for r in engine.recommend(user, k=len(catalog), exclude_recent=False).results}
        probe = copy.deepcopy(online)  # scoring applies the probe event: keep the shared store as it is
        row = probe.score_batch(EventBatch.from_table(make_events([user], [catalog.ids[0]], [10**6])), catalog)[0]
        assert sorted(served) == sorted(catalog.ids), user
        np.testing.assert_allclose([served[i] for i in catalog.ids], row.numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=user)


def test_unserved_partitions_are_missing_and_excluded_from_total():
    train, warmup, test = _tables()
    result = evaluate(HashModel({"observed"}, "observed-only"), test, train, EvalConfig(batch_size=4), warmup)
    summary = result.summary()
    parts = summary["partitions"]
    assert parts["new_user"]["rank"] is None and parts["new_item"]["hit_rate"] is None
    assert parts["observed"]["rank"] is not None
    assert summary["total"]["count"] == parts["observed"]["count"] < len(test)
    row = table1_markdown([summary]).splitlines()[4]
    assert row.count("–") == 6  # new users, new items, first interactions: rank and HR each


def test_item_prior_interactions_and_log_bins():
    history = make_events(["a", "b", "c"], ["x", "x", "y"], [0, 1, 2])
    events = make_events(["a", "b", "c", "d"], ["x", "z", "x", "z"], [3, 4, 5, 6])
    assert item_prior_interactions([history], events).tolist() == [2, 0, 3, 1]
    bins = log_binned_means(np.array([0, 1, 2, 3, 4, 9]), np.array([0.5, 0.4, 0.3, 0.1, 0.2, 0.0]))
    assert [(b["lo"], b["hi"], b["count"]) for b in bins] == [(0, 0, 1), (1, 1, 1), (2, 3, 2), (4, 7, 1), (8, 15, 1)]
    assert bins[2]["rank"] == pytest.approx(0.2)


def test_result_serialisation(tmp_path):
    train, warmup, test = _tables()
    result = evaluate(HashModel(name="FELRec-Q (keep)"), test, train, EvalConfig(batch_size=8), warmup)
    paths = result.save(tmp_path)
    assert json.loads(paths["json"].read_text())["model"] == "FELRec-Q (keep)"
    assert pq.read_table(paths["parquet"]).equals(result.events)


def _tiny_felrec():
    torch.manual_seed(0)
    enc = EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32)
    model = FELRec(enc, ModelConfig(variant="q", queue_size=64))
    return model, RepresentationStore(16, 8)


@pytest.mark.parametrize("nn_neighbors", [None, 2])
def test_felrec_online_restores_train_mode_and_names_itself(nn_neighbors):
    model, store = _tiny_felrec()
    train, warmup, test = _tables()
    online = FELRecOnline(model, store, CacheConfig(), nn_neighbors=nn_neighbors)
    catalog = ItemCatalog()
    catalog.add(np.asarray(train.column("item").to_pylist(), dtype=object))
    batch = EventBatch.from_table(test.slice(0, 8))
    catalog.add(batch.item)
    scores = online.score_batch(batch, catalog)
    assert scores.shape == (8, len(catalog)) and model.training  # train/eval mode restored
    assert torch.isfinite(scores).all()
    assert online.name == ("FELRec-Q-NN" if nn_neighbors else "FELRec-Q")
