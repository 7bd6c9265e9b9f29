"""benchmarks/bench_online.py: the in-process adoption never lets the evaluator use a version trained
on an event before that event is applied (the worker's rule, pipelines/adoption.py)."""

import numpy as np
import pytest

from benchmarks.bench_online import Arm, Replay, Stream, cached_events, train_offline
from felrec_stream.config import CacheConfig, Configs, EncoderConfig, EvalConfig, ModelConfig, TrainingConfig
from felrec_stream.data import synthetic

ENC = EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.1, output_norm="running")
MODEL = ModelConfig(use_mlp=False, temperature=0.5, queue_size=64, cache_update="post_event",
                    mask_own_negatives=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    events = synthetic.generate(synthetic.SyntheticConfig(n_users=40, n_items=30, n_events=1200, n_clusters=3,
                                                          drift="abrupt", seed=2)).events
    configs = Configs(encoder=ENC, model=MODEL, cache=CacheConfig(history_len=8), eval=EvalConfig(batch_size=48),
                      training=TrainingConfig(batch_size=32, epochs=1, warmup_epochs=0, lr=0.05,
                                              val_fraction=0.1, test_fraction=0.01))
    stream = Stream("tiny", events, 400, 700, 600, 0.01)
    ckpt = train_offline(events.slice(0, 400), configs, tmp_path_factory.mktemp("offline"))
    return stream, ckpt, configs, tmp_path_factory.mktemp("work")


@pytest.mark.parametrize("lead", [0, 500])
def test_adopted_versions_were_trained_only_on_applied_events(setup, lead):
    """With the learner reading up to 500 events ahead, every version still waits until the evaluator
    has applied every event it was trained on; versions are adopted in order."""
    stream, ckpt, configs, work = setup
    replay = Replay(stream, ckpt, configs, Arm("online", interval=64), work / f"lead{lead}", learner_lead=lead)
    run = replay.run(len(stream.events))
    assert len(run.rank) == len(stream.events) - stream.offline_end and np.all(np.isfinite(run.rank))
    assert len(run.adoptions) >= 5
    for applied, name, trained_through in run.adoptions:
        assert trained_through <= applied, (name, trained_through, applied)
        assert trained_through > cached_events(ckpt)  # trained on stream events
    names = [name for _, name, _ in run.adoptions]
    assert names == sorted(names) and len(set(names)) == len(names)
    applied_at = [applied for applied, _, _ in run.adoptions]
    if lead:  # the learner is ahead: a version waits for the evaluator, adopted as soon as its events are
        assert any(through > applied - 48 for applied, _, through in run.adoptions)
    assert applied_at == sorted(applied_at)


def test_frozen_arm_never_adopts_and_matches_itself(setup):
    stream, ckpt, configs, work = setup
    a = Replay(stream, ckpt, configs, Arm("frozen"), work / "f1").run(len(stream.events))
    b = Replay(stream, ckpt, configs, Arm("frozen"), work / "f2").run(len(stream.events))
    assert a.adoptions == [] and np.array_equal(a.rank, b.rank) and np.array_equal(a.hit, b.hit)
