"""Baselines: they learn on the synthetic stream, respect the partition rules and the protocol."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from felrec_stream.config import EncoderConfig, EvalConfig
from felrec_stream.data.split import chronological_split
from felrec_stream.data.synthetic import SyntheticConfig, generate
from felrec_stream.errors import ConfigError, TrainingError
from felrec_stream.model.felrec import Encoder
from felrec_stream.stream.events import EventBatch, make_events
from training.baselines import ADAPTERS, BASELINES, build_baseline, fit, make_config
from training.baselines import models as M
from training.baselines.online import gather_catalog, rank_within
from training.evaluate import evaluate
from training.protocol import ItemCatalog, OnlineModel

EVAL = EvalConfig(batch_size=256, num_negatives=50)
# 63% of this synthetic stream's events repeat an item of the user's last 64, which the query API's
# rule ranks last: learning is measured without it (the rule has its own tests in test_evaluate.py).
ALL_ITEMS = 0
SERVED = {"bpr-mf": {"observed"}, "gru4rec": {"observed", "new_user"}, "gru4rec-bptt": {"observed", "new_user"},
          "sasrec": {"observed", "new_user"}, "jodie": {"observed", "new_user", "new_item", "first_item"}}


@pytest.fixture(scope="module")
def split():
    data = generate(SyntheticConfig(n_users=150, n_items=100, n_events=5000, seed=3))
    return chronological_split(data.events)


@pytest.fixture(scope="module")
def trained(split):
    """Every baseline trained (tiny preset) with validation checkpointing, evaluated on test."""
    out = {}
    for name in BASELINES:
        adapter = build_baseline(name, make_config(name, "tiny"), split.train)
        fitted = fit(adapter, split.train,
                     lambda m: evaluate(m, split.val, split.train, EVAL, exclude_recent=ALL_ITEMS).mean_rank)
        out[name] = (fitted, evaluate(fitted.model, split.test, split.train, EVAL, warmup=split.val,
                                      exclude_recent=ALL_ITEMS))
    return out


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_learns_better_than_random(trained, name):
    _, result = trained[name]
    summary = result.summary()
    assert summary["total"]["rank"] < 0.35, summary["total"]
    for part in SERVED[name] - {"first_item"}:  # an item's first interaction carries no information
        cell = summary["partitions"][part]
        assert cell["count"] > 0 and cell["rank"] < 0.45, (part, cell)


@pytest.mark.parametrize("name", BASELINES)
def test_partition_rules_no_number_for_unsupported(trained, name):
    fitted, result = trained[name]
    assert fitted.model.partitions == frozenset(SERVED[name])
    assert isinstance(fitted.model, OnlineModel)
    for part, cell in result.summary()["partitions"].items():
        assert cell["served"] == (part in SERVED[name])
        if part not in SERVED[name]:
            assert cell["rank"] is None and cell["hit_rate"] is None


@pytest.mark.parametrize("name", BASELINES)
def test_parameter_count_is_the_models_own_and_grows_with_data(trained, split, name):
    fitted, _ = trained[name]
    assert fitted.model.num_parameters == sum(p.numel() for p in fitted.model.model.parameters())
    assert fitted.model.params_grow_with_data
    bigger = generate(SyntheticConfig(n_users=300, n_items=250, n_events=5000, seed=4)).events
    assert build_baseline(name, make_config(name, "tiny"), bigger).num_parameters > fitted.model.num_parameters


def test_fit_keeps_the_best_validation_checkpoint(split):
    adapter = build_baseline("bpr-mf", make_config("bpr-mf", "tiny", epochs=4, eval_every=1), split.train)
    scores = iter([0.4, 0.2, 0.3, 0.35])
    fitted = fit(adapter, split.train, lambda m: next(scores))
    assert fitted.best_epoch == 2 and fitted.best_val_rank == 0.2
    assert [h["val_rank"] for h in fitted.history] == [0.4, 0.2, 0.3, 0.35]
    assert fitted.model is not adapter  # a copy frozen at epoch 2, not the last state
    assert not torch.equal(fitted.model.model.P.weight, adapter.model.P.weight)


def test_fit_stops_on_divergence(split, monkeypatch):
    adapter = build_baseline("jodie", make_config("jodie", "tiny", epochs=5, eval_every=1), split.train)
    monkeypatch.setattr(adapter, "train_epoch", lambda train: math.nan)
    with pytest.raises(TrainingError, match="diverged"):
        fit(adapter, split.train, lambda m: 0.1)
    with pytest.raises(TrainingError, match="diverged"):
        fit(adapter, split.train)
    losses = iter([0.5, 0.4, math.nan, 0.3, 0.2])
    monkeypatch.setattr(adapter, "train_epoch", lambda train: next(losses))
    vals = iter([0.3, float("nan")])  # NaN scores at epoch 2 count as divergence too
    fitted = fit(adapter, split.train, lambda m: next(vals))
    assert fitted.best_epoch == 1 and len(fitted.history) == 2


@pytest.mark.parametrize("name", BASELINES)
def test_scores_never_use_the_events_own_item(split, name):
    """Changing the last event's item must not change any score of its batch (scored before learned)."""
    adapter = build_baseline(name, make_config(name, "tiny", epochs=1), split.train)
    fit(adapter, split.train)
    batch = EventBatch.from_table(split.val.slice(0, 64))
    other = batch.item.copy()
    other[-1] = batch.item[0] if batch.item[0] != batch.item[-1] else batch.item[1]
    catalog = ItemCatalog()
    catalog.add(np.asarray(split.train.column("item").to_pylist(), dtype=object))
    catalog.add(batch.item)
    a, b = copy.deepcopy(adapter), copy.deepcopy(adapter)
    torch.manual_seed(0)
    s1 = a.score_batch(batch, catalog)
    torch.manual_seed(0)
    s2 = b.score_batch(EventBatch(batch.user, other, batch.timestamp, batch.event_id), catalog)
    assert s1.shape == (64, len(catalog))
    assert torch.equal(s1, s2)


def test_unknown_items_score_minus_inf_and_jodie_scores_them(split):
    new = make_events(["u1", "u_new"], ["i_new", "i_new"], [2_000_000_000, 2_000_000_001])
    catalog = ItemCatalog()
    catalog.add(np.asarray(split.train.column("item").to_pylist(), dtype=object))
    catalog.add(np.asarray(["i_new"], dtype=object))
    for name in BASELINES:
        adapter = build_baseline(name, make_config(name, "tiny"), split.train)
        scores = adapter.score_batch(EventBatch.from_table(new), catalog)  # (2, C)
        assert scores.shape == (2, len(catalog))
        if name == "jodie":
            assert torch.isfinite(scores).all()
        else:
            assert torch.isneginf(scores[:, -1]).all() and torch.isfinite(scores[:, :-1]).all()


def test_gru4rec_reuses_cached_session_state(split):
    adapter = build_baseline("gru4rec", make_config("gru4rec", "tiny"), split.train)
    catalog = ItemCatalog()
    catalog.add(np.asarray(split.train.column("item").to_pylist(), dtype=object))
    first = make_events(["u1", "u1"], ["i1", "i2"], [10, 11])
    adapter.score_batch(EventBatch.from_table(first), catalog)
    slot = adapter.user_ids.lookup(["u1"])[0]
    state = adapter.hidden[slot].clone()
    assert state.abs().sum() > 0 and adapter.prev_item[slot] == adapter.items(["i2"])[0]
    again = make_events(["u1", "u_new"], ["i3", "i3"], [12, 12])
    s_again = adapter.score_batch(EventBatch.from_table(again), catalog)
    fresh = build_baseline("gru4rec", make_config("gru4rec", "tiny"), split.train)
    s_fresh = fresh.score_batch(EventBatch.from_table(again), catalog)
    assert not torch.equal(s_again[0], s_fresh[0])  # the cached session state was used
    assert torch.equal(s_again[1], s_fresh[1])  # a new user starts from an empty session


def test_sasrec_blocks_are_felrecs_encoder_blocks():
    cfg = EncoderConfig(d_model=16, n_layers=3, n_heads=2, d_ff=32)
    sasrec = M.SASRec(10, cfg, max_len=8)
    encoder = Encoder(cfg)
    assert str(sasrec.blocks) == str(encoder.blocks) and str(sasrec.norm) == str(encoder.norm)
    shapes = lambda m: [(n, tuple(p.shape)) for n, p in m.named_parameters()]  # noqa: E731
    assert shapes(sasrec.blocks) == shapes(encoder.blocks)
    block = sasrec.blocks[0]
    assert block.norm_first and block.act is torch.nn.functional.gelu  # pre-norm, GELU as in FELRec


def test_sasrec_is_causal():
    model = M.SASRec(10, EncoderConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32), max_len=8).eval()
    seq = torch.tensor([[M.START, 2, 3, 4, 5]])
    changed = seq.clone()
    changed[0, -1] = 9
    assert torch.allclose(model(seq)[:, :-1], model(changed)[:, :-1], atol=1e-6)


def test_sequences_are_left_aligned_with_start():
    data = generate(SyntheticConfig(n_users=20, n_items=20, n_events=300, n_clusters=2, seed=1))
    adapter = build_baseline("sasrec", make_config("sasrec", "tiny", max_len=4), data.events)
    batch = EventBatch.from_table(make_events(["a"] * 6, ["i1", "i2", "i3", "i4", "i5", "zzz"], list(range(6))))
    plan, slots, items = adapter._plan(batch)
    seq, lengths = adapter._sequences(plan, np.arange(6))
    i = adapter.items(["i1", "i2", "i3", "i4", "i5"])
    assert seq[0].tolist()[:1] == [M.START] and lengths[0] == 1
    assert seq[2, :3].tolist() == [M.START, i[0], i[1]] and lengths[2] == 3
    assert seq[5, :4].tolist() == [i[1], i[2], i[3], i[4]] and lengths[5] == 4  # window full: no START


def test_rank_within_and_gather_catalog():
    assert rank_within(np.array([3, 1, 3, 3, 1])).tolist() == [0, 0, 1, 2, 1]
    scores = torch.tensor([[1.0, 2.0, 3.0]])
    out = gather_catalog(scores, torch.tensor([2, -1, 0]))
    assert out.tolist() == [[3.0, float("-inf"), 1.0]]


def test_configs_follow_the_paper_appendix():
    for name in BASELINES:
        cfg = make_config(name)
        assert cfg.momentum == 0.9 and 1 <= cfg.num_negatives <= 32
        assert cfg.batch_size == (4096 if name == "bpr-mf" else 1024)
    assert make_config("bpr-mf").dim == 128 and make_config("gru4rec").n_layers == 3
    assert make_config("gru4rec").hidden == 128 and make_config("jodie").dim == 128
    assert make_config("sasrec").encoder == EncoderConfig() and make_config("sasrec").max_len == 64
    assert make_config("gru4rec-bptt").max_len == 64 and make_config("gru4rec-bptt").dropout == 0.1
    with pytest.raises(ConfigError):
        make_config("nope")
    with pytest.raises(ConfigError):
        make_config("sasrec", "small", nope=1)
    with pytest.raises(ConfigError):
        make_config("jodie", lr=-1.0)
    assert set(ADAPTERS) == set(BASELINES)
