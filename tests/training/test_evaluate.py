import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from felrec_stream.config import CacheConfig, EncoderConfig, EvalConfig, ModelConfig
from felrec_stream.model.felrec import FELRec
from felrec_stream.state.store import RepresentationStore
from felrec_stream.stream.events import EventBatch, make_events
from training.evaluate import evaluate, item_prior_interactions, log_binned_means
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


def _brute_force(train, warmup, events, score):
    """Per event (rank, hit with every other catalog item as negative, partition, prior count), one
    event at a time: the catalog holds the items met before the event plus its own."""
    train_items, train_users = set(train.column("item").to_pylist()), set(train.column("user").to_pylist())
    history = train.column("item").to_pylist() + warmup.column("item").to_pylist()
    users, items = events.column("user").to_pylist(), events.column("item").to_pylist()
    out = []
    for n, (u, i) in enumerate(zip(users, items)):
        catalog = set(history) | set(items[: n + 1])
        s = score(n)
        others = [s(u, j) for j in catalog if j != i]
        rank = (sum(o > s(u, i) for o in others) + 0.5 * sum(o == s(u, i) for o in others)) / max(len(others), 1)
        prior = history.count(i) + items[:n].count(i)
        part = ("first_item" if prior == 0 else "new_item" if i not in train_items else
                "new_user" if u not in train_users else "observed")
        out.append((rank, rank * len(others) < 3, part, prior))
    return out


def test_evaluator_matches_brute_force():
    train, warmup, test = _tables()
    cfg = EvalConfig(batch_size=4, num_negatives=1000, hr_k=3)
    model = HashModel()
    result = evaluate(model, test, train, cfg, warmup=warmup)
    expected = _brute_force(train, warmup, test, lambda n: _score)
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


def test_popularity_counts_every_earlier_event():
    train, warmup, test = _tables()
    cfg = EvalConfig(batch_size=4, num_negatives=1000, hr_k=3)
    result = evaluate(PopularityOnline([train]), test, train, cfg, warmup=warmup)
    history = train.column("item").to_pylist() + warmup.column("item").to_pylist()
    items = test.column("item").to_pylist()

    def scorer(n):
        seen = history + items[:n]  # earlier events of the same batch count, the event itself not
        return lambda u, i: float(seen.count(i))

    expected = _brute_force(train, warmup, test, scorer)
    np.testing.assert_allclose(result.events.column("rank").to_numpy(), [e[0] for e in expected])


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
