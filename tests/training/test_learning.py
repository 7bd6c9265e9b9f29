"""Training rules of issue 17: windows whose batches are drawn across users without leakage, the
learning control, the moving-average cache writer, cache negatives and cached positives."""

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

from felrec_stream.config import (CacheConfig, Configs, EncoderConfig, ModelConfig, merge_sections, preset_sections,
                                  replace)
from felrec_stream.data import synthetic
from felrec_stream.errors import ConfigError
from felrec_stream.model.felrec import FELRec
from felrec_stream.state import engine
from felrec_stream.state.checkpoint import load_checkpoint
from felrec_stream.state.store import RepresentationStore
from felrec_stream.stream.events import EventBatch
from training.train import (Stepper, draw_negatives, served_targets, train, train_epoch, train_window,
                            update_moving_average)

ENC = EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, output_norm="running")
CACHE = CacheConfig(history_len=8)


def _events(n_events=600, seed=3):
    cfg = synthetic.SyntheticConfig(n_users=30, n_items=25, n_events=n_events, n_clusters=3, seed=seed)
    return synthetic.generate(cfg).events


def _setup(**model):
    torch.manual_seed(0)
    net = FELRec(ENC, ModelConfig(use_mlp=False, temperature=0.5, queue_size=64, cache_update="post_event",
                                  **model))
    store = RepresentationStore.for_cache(ENC.d_model, CACHE)
    return net, store, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)


def test_window_batches_see_only_earlier_events_and_the_cache_before_the_window(monkeypatch):
    """Every step of a window encodes exactly what a per-event rule allows: the entity's earlier
    events (in time order, at most L) and the vectors the cache held before the window, although
    the steps draw their events from all of the window in random order."""
    events = _events()
    model, store, optimizer = _setup()
    train_window(model, store, optimizer, EventBatch.from_table(events.slice(0, 200)), 64, CACHE,
                 np.random.default_rng(0))  # a warm cache
    window = EventBatch.from_table(events.slice(200, 256))
    vectors_before = {kind: store.tables[kind].vectors.all().clone() for kind in store.tables}
    seen_rows, real = [], engine.event_sequences

    def checked(store_, inputs, rows, device, cache, ranks=None):
        for kind in store_.tables:  # nothing written before the window ends
            n = len(vectors_before[kind])
            torch.testing.assert_close(store_.tables[kind].vectors.all()[:n], vectors_before[kind])
        seen_rows.append(rows.copy())
        return real(store_, inputs, rows, device, cache, ranks)

    monkeypatch.setattr("training.train.event_sequences", checked)
    users_before = {u: list(store.users.read(store.users.slots(np.array([u]), create=False)).rows[0])
                    for u in set(window.user)}
    inputs = engine.prepare_batch(store, window, "cpu", CACHE, before=False)
    train_window(model, store, optimizer, window, 16, CACHE, np.random.default_rng(1))
    rows = np.concatenate(seen_rows)
    assert sorted(rows.tolist()) == list(range(len(window)))  # every event once
    assert any((r != np.arange(r[0], r[0] + len(r))).any() for r in seen_rows)  # not consecutive runs
    for e in range(len(window)):  # brute force: the user's history before event e
        stored = [s for s in users_before[window.user[e]] if s >= 0]
        earlier = [int(store.items.slots(np.array([window.item[j]]), create=False)[0])
                   for j in range(e) if window.user[j] == window.user[e]]
        expected = (stored + earlier)[-CACHE.history_len:]
        got = inputs.user_plan.event_history[e]
        assert [s for s in got if s >= 0] == expected


def test_windowed_training_is_deterministic_and_spreads_users_over_the_batches():
    events = _events(1200)

    def run():
        model, store, optimizer = _setup()
        stats = train_epoch(model, store, optimizer, events, 32, CACHE, window=256, seed=5)
        return stats, model.state_dict()

    (a, state_a), (b, state_b) = run(), run()
    assert a == b
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=0, atol=0)
    model, store, optimizer = _setup()
    consecutive = train_epoch(model, store, optimizer, events, 32, CACHE, seed=5)
    assert a.users_per_batch > consecutive.users_per_batch


def test_the_learning_control_takes_no_step_but_reports_its_loss_against_chance():
    events = _events()
    model, store, optimizer = _setup()
    start = {k: v.clone() for k, v in model.named_parameters()}
    stats = train_epoch(model, store, optimizer, events, 64, CACHE, frozen=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, start[name], rtol=0, atol=0)
    assert np.isfinite(stats.loss) and stats.chance > 0
    assert store.items.history.counts.sum() == len(events)  # the cache loop ran


def test_the_moving_average_writes_the_cache_and_trails_the_trained_weights():
    events = _events()
    model, store, optimizer = _setup()
    writer = FELRec(ENC, model.config)
    writer.load_state_dict(model.state_dict())
    writer.eval()
    train_epoch(model, store, optimizer, events.slice(0, 256), 64, CACHE, writer=writer, ema_decay=0.9)
    assert not torch.allclose(model.encoder.fc.weight, writer.encoder.fc.weight)
    before = RepresentationStore.for_cache(ENC.d_model, CACHE)
    before.load_state_dict(store.state_dict())
    last = EventBatch.from_table(events.slice(256, 64))
    fc = writer.encoder.fc.weight.clone()
    statistics = {name: b.clone() for name, b in writer.named_buffers()}  # the writer's, before it writes
    stepper = Stepper(optimizer, model, writer=writer, decay=0.75)
    train_window(model, store, stepper, last, 64, CACHE, np.random.default_rng(0))
    torch.testing.assert_close(writer.encoder.fc.weight, 0.75 * fc + 0.25 * model.encoder.fc.weight)
    # what the window wrote: the (updated) writer's encodings of the touched users, not the model's
    inputs = engine.with_after(before, engine.prepare_batch(before, last, "cpu", CACHE, before=False), "cpu", CACHE)
    expected = copy.deepcopy(writer)
    expected.load_state_dict({**expected.state_dict(), **statistics})
    users, _ = engine.encode_after(expected, inputs)
    written = store.users.vectors.get(torch.from_numpy(inputs.user_plan.unique_slots))
    torch.testing.assert_close(written, users)
    model.eval()
    assert not torch.allclose(engine.encode_after(model, inputs)[0], written)
    update_moving_average(writer, model, 0.5)
    torch.testing.assert_close(writer.encoder.fc.weight, 0.5 * (0.75 * fc + 0.25 * model.encoder.fc.weight)
                               + 0.5 * model.encoder.fc.weight)


def test_cache_negatives_are_drawn_from_written_entities_only():
    events = _events()
    model, store, optimizer = _setup(negatives="cache", negatives_per_step=50)
    assert draw_negatives(store, model.config, np.random.default_rng(0), torch.device("cpu")) is None  # empty cache
    train_epoch(model, store, optimizer, events.slice(0, 300), 64, CACHE)
    a = draw_negatives(store, model.config, np.random.default_rng(0), torch.device("cpu"))
    b = draw_negatives(store, model.config, np.random.default_rng(0), torch.device("cpu"))
    assert a.item_ids.shape == (50,) and torch.equal(a.item_ids, b.item_ids)
    assert (store.items.history.counts[a.item_ids.numpy()] > 0).all()
    torch.testing.assert_close(a.items, store.items.vectors.get(a.item_ids))


def test_cached_positives_are_what_the_cache_serves_or_the_fresh_encoding():
    events = _events()
    model, store, optimizer = _setup(positives="cached")
    train_epoch(model, store, optimizer, events.slice(0, 300), 64, CACHE)
    table = events.slice(300, 40)
    for name in ("user", "item"):  # a few entities the cache has never met
        column = table.column(name).to_pylist()
        column[::7] = [f"new-{name}-{k}" for k in range(len(column[::7]))]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(column, pa.string()))
    batch = EventBatch.from_table(table)
    inputs = engine.prepare_batch(store, batch, "cpu", CACHE)
    rows = np.arange(len(batch))
    u, x = torch.randn(len(batch), 16), torch.randn(len(batch), 16)
    k_u, k_x = served_targets(model, store, inputs, rows, u, x)
    for slots, table, fresh, got in ((inputs.user_slots, store.users, u, k_u),
                                     (inputs.item_slots, store.items, x, k_x)):
        known = table.history.counts[slots] > 0
        assert known.any() and (~known).any()
        torch.testing.assert_close(got[known], table.vectors.get(torch.from_numpy(slots[known])))
        torch.testing.assert_close(got[~known], fresh[~known])
    fresh_rule = FELRec(ENC, replace(model.config, positives="fresh"))
    assert served_targets(fresh_rule, store, inputs, rows, u, x) is None


@pytest.mark.parametrize("window", [0, 128])
def test_pre_event_cache_rule_under_windows(window):
    """pre_event writes each entity's latest event encoding; windows keep that rule."""
    events = _events()
    torch.manual_seed(0)
    model = FELRec(ENC, ModelConfig(use_mlp=False, queue_size=64))
    store = RepresentationStore.for_cache(ENC.d_model, CACHE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = train_epoch(model, store, optimizer, events, 32, CACHE, window=window)
    assert np.isfinite(stats.loss)
    written = store.items.history.counts[: len(store.items)] > 0
    assert written.all() and store.items.vectors.all()[: len(store.items)].norm(dim=1).gt(0).all()


@pytest.mark.slow
def test_on_planted_clusters_the_trained_encoder_beats_its_initial_weights(tmp_path):
    """The learning control on the synthetic generator: the shipped recipe (preset small), one epoch,
    trained against frozen at its initial weights, both scored on validation the same way (the
    generator repeats items, so the already-seen rule is off here, as in tests/training/test_train.py)."""
    events = synthetic.generate(synthetic.SyntheticConfig()).events  # 300 users, 200 items, 8 clusters

    def best_val_rank(frozen: bool) -> float:
        sections = merge_sections(preset_sections("small"), {"training": {"epochs": 1, "frozen": frozen},
                                                             "eval": {"batch_size": 512},
                                                             "scoring": {"exclude_recent": False}})
        return train(events, Configs.from_dict(sections), tmp_path / str(frozen)).best_val_rank

    initial, trained = best_val_rank(True), best_val_rank(False)
    assert trained < initial - 0.01, (trained, initial)


def test_the_moving_average_moves_only_when_the_weights_step():
    """training.accumulate: the writer follows optimizer steps, not batches."""
    events = _events()
    model, store, optimizer = _setup()
    writer = FELRec(ENC, model.config)
    writer.load_state_dict(model.state_dict())
    stepper = Stepper(optimizer, model, every=2, writer=writer, decay=0.5)
    start = writer.encoder.fc.weight.clone()
    batches = [EventBatch.from_table(events.slice(64 * k, 64)) for k in range(3)]
    train_window(model, store, stepper, batches[0], 64, CACHE)
    torch.testing.assert_close(writer.encoder.fc.weight, start)  # gradients pending, no step yet
    train_window(model, store, stepper, batches[1], 64, CACHE)
    torch.testing.assert_close(writer.encoder.fc.weight, 0.5 * start + 0.5 * model.encoder.fc.weight)
    train_window(model, store, stepper, batches[2], 64, CACHE)
    moved = writer.encoder.fc.weight.clone()
    stepper.flush()  # the end of an epoch steps on the partial group, and the writer follows
    assert not torch.allclose(writer.encoder.fc.weight, moved)


def test_a_resumed_run_with_a_moving_average_continues_exactly(tmp_path):
    events = _events(900)
    sections = merge_sections(preset_sections("small"), {
        "encoder": {"d_model": 16, "d_ff": 32}, "cache": {"history_len": 8}, "eval": {"batch_size": 256},
        "training": {"epochs": 2, "ema_decay": 0.9, "batch_size": 64}, "scoring": {"exclude_recent": False}})
    configs = Configs.from_dict(sections)
    whole = train(events, configs, tmp_path / "whole")
    train(events, replace(configs, training=replace(configs.training, epochs=1)), tmp_path / "halves")
    resumed = train(events, configs, tmp_path / "halves", resume=True)
    a, b = (load_checkpoint(r.last_checkpoint) for r in (whole, resumed))
    assert a.online_state is not None
    for state_a, state_b in ((a.model_state, b.model_state), (a.online_state, b.online_state)):
        for name in state_a:
            torch.testing.assert_close(state_a[name], state_b[name], rtol=0, atol=0, msg=name)
    assert [h["val_rank"] for h in whole.history] == [h["val_rank"] for h in resumed.history]


def test_a_moving_average_with_batch_statistics_is_refused(tmp_path):
    sections = merge_sections(preset_sections("small"), {"encoder": {"output_norm": "batch"},
                                                          "training": {"ema_decay": 0.9}})
    with pytest.raises(ConfigError, match="ema_decay needs encoder.output_norm"):
        train(_events(), Configs.from_dict(sections), tmp_path)


def test_a_query_model_serves_users_by_its_encoding_of_their_history():
    """FELRecOnline(query_model=...): a user's scores are the query model's encoding of its history
    before the event against the served item vectors (the prototype of benchmarks/check_query_encoder.py)."""
    from training.felrec_online import FELRecOnline
    from training.protocol import ItemCatalog

    events = _events()
    model, store, optimizer = _setup()
    train_epoch(model, store, optimizer, events.slice(0, 400), 64, CACHE)
    query = copy.deepcopy(model)
    torch.nn.init.normal_(query.encoder.fc.weight)  # another encoder than the cache loop's
    twin = RepresentationStore.for_cache(ENC.d_model, CACHE)
    twin.load_state_dict(store.state_dict())
    batch = EventBatch.from_table(events.slice(400, 32))
    catalog = ItemCatalog()
    catalog.add(np.asarray(events.column("item").to_pylist(), dtype=object))
    untouched = np.flatnonzero(~np.isin(np.asarray(catalog.ids, dtype=object), batch.item))
    untouched = untouched[store.items.ids.lookup([catalog.ids[i] for i in untouched]) >= 0]
    scores, _ = FELRecOnline(model, store, CACHE, query_model=query).score_parts(batch, catalog, with_prior=False)
    inputs = engine.prepare_batch(twin, batch, "cpu", CACHE)
    with torch.no_grad():
        q = torch.nn.functional.normalize(engine.encode_sequences(query.eval(), inputs.users_before), dim=-1)
    slots = twin.items.ids.lookup([catalog.ids[i] for i in untouched])
    items = torch.nn.functional.normalize(twin.items.vectors.get(torch.from_numpy(slots)), dim=-1)
    torch.testing.assert_close(scores[:, torch.from_numpy(untouched)], q @ items.T)
