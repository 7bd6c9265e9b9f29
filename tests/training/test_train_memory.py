"""Memory levers change no result: the heap handed back to the OS (training and evaluation) leaves
losses, weights, cache and scores bit-identical, run after run; a smaller activation budget changes
the trained weights by float rounding only."""

import platform

import pytest
import torch

import training.evaluate as evaluate_module
import training.felrec_online as felrec_online_module
import training.train as train_module
from felrec_stream.config import CacheConfig, EncoderConfig, EvalConfig, ModelConfig
from felrec_stream.data import synthetic
from felrec_stream.data.split import chronological_split
from felrec_stream.device import release_freed_memory
from felrec_stream.model.felrec import FELRec
from felrec_stream.state.store import RepresentationStore
from felrec_stream.stream.events import iter_batches
from training.evaluate import evaluate
from training.felrec_online import FELRecOnline

ENC = EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32)
MODEL = ModelConfig(variant="q", queue_size=64, proj_hidden=16, proj_out=16)


def _train_once(events, max_activation_mb: int = 1):
    torch.manual_seed(0)
    model = FELRec(ENC, MODEL)
    store = RepresentationStore.for_cache(ENC.d_model, CacheConfig(), "cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    stats = train_module.train_epoch(model, store, optimizer, events, 100, max_activation_mb=max_activation_mb,
                                     seed=0)
    return stats, model.state_dict(), store.users.vectors.all().clone(), store.items.vectors.all().clone()


def _assert_identical(a, b):
    assert a[0] == b[0]  # EpochStats: loss, chance, users per batch
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def test_releasing_freed_memory_changes_no_result_and_training_stays_deterministic(monkeypatch):
    events = synthetic.generate(synthetic.SyntheticConfig(n_users=30, n_items=20, n_events=400, n_clusters=2,
                                                          seed=3)).events
    released = _train_once(events)
    _assert_identical(released, _train_once(events))  # same seed, same threads: the same run
    calls = []
    monkeypatch.setattr(train_module, "release_freed_memory", lambda: calls.append(1) or False)
    kept = _train_once(events)
    assert len(calls) > 2 * 4  # per window of 100 events, before each loss, between re-encoded buckets
    _assert_identical(released, kept)


def test_release_freed_memory_is_a_no_op_without_glibc():
    result = release_freed_memory()
    assert isinstance(result, bool)
    if platform.system() != "Linux":
        assert result is False


def test_a_smaller_activation_budget_trains_the_same_model_up_to_float_rounding():
    """The budget re-encodes the buckets beyond it for backward: the same masks and outputs, the
    gradients summed in another order (so not bit for bit: the default went 256 -> 128 MB)."""
    events = synthetic.generate(synthetic.SyntheticConfig(n_users=30, n_items=20, n_events=400, n_clusters=2,
                                                          seed=3)).events
    every, budgeted = _train_once(events, max_activation_mb=0), _train_once(events, max_activation_mb=1)
    assert budgeted[0].loss == pytest.approx(every[0].loss, rel=1e-6)
    for key, value in every[1].items():
        torch.testing.assert_close(budgeted[1][key], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(budgeted[2], every[2], rtol=1e-5, atol=1e-5)


def test_replay_and_evaluation_with_freed_memory_released_score_the_same(monkeypatch):
    events = synthetic.generate(synthetic.SyntheticConfig(n_users=30, n_items=20, n_events=600, n_clusters=2,
                                                          seed=4)).events
    split = chronological_split(events, 0.2, 0.1)
    torch.manual_seed(0)
    model = FELRec(ENC, MODEL).eval()

    def run():
        store = RepresentationStore.for_cache(ENC.d_model, CacheConfig(), "cpu")
        online = FELRecOnline(model, store, CacheConfig())
        for batch in iter_batches(split.train, 64):
            online.observe(batch)
        return evaluate(online, split.val, split.train, EvalConfig(batch_size=32)).events

    released = run()
    calls = []
    monkeypatch.setattr(evaluate_module, "release_freed_memory", lambda: calls.append(1) or False)
    monkeypatch.setattr(felrec_online_module, "release_freed_memory", lambda: calls.append(1) or False)
    kept = run()
    assert len(calls) > 8 and released.equals(kept)  # replayed and scored batches
