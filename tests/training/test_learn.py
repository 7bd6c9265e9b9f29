"""The online learner (training/learn.py): the training job's step on the live stream, versions,
the guard, the reservoir and exact restarts."""

import numpy as np
import pytest
import torch

from felrec_stream.config import CacheConfig, Configs, EncoderConfig, LearnConfig, ModelConfig, TrainingConfig
from felrec_stream.data import synthetic
from felrec_stream.model.felrec import FELRec
from felrec_stream.state.checkpoint import Checkpoint, save_checkpoint
from felrec_stream.state.snapshot import SnapshotManager
from felrec_stream.state.store import RepresentationStore
from felrec_stream.state.versions import VersionStore, model_version
from felrec_stream.stream.events import EventBatch
from felrec_stream.stream.source import InMemorySource
from training.learn import Learner, Reservoir
from training.train import train_epoch

ENC = EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.1, output_norm="running")
MODEL = ModelConfig(use_mlp=False, temperature=0.5, queue_size=64, cache_update="post_event",
                    mask_own_negatives=True)
CACHE = CacheConfig(history_len=8)
BATCH = 32


def _events(n_events=640, seed=3):
    cfg = synthetic.SyntheticConfig(n_users=40, n_items=30, n_events=n_events, n_clusters=3, seed=seed)
    return synthetic.generate(cfg).events


def _checkpoint(tmp_path, lr=0.05):
    torch.manual_seed(0)
    configs = Configs(encoder=ENC, model=MODEL, cache=CACHE, training=TrainingConfig(batch_size=BATCH, lr=lr))
    model = FELRec(ENC, MODEL)
    return save_checkpoint(Checkpoint(model.state_dict(), configs, epoch=0), tmp_path / "init.pt"), configs


def _learner(tmp_path, events, ckpt_path, name="run", **config):
    from felrec_stream.state.checkpoint import load_checkpoint

    settings = {"start": "earliest", "publish_every": 128, "guard_window": 64, "until_end": True, **config}
    return Learner(load_checkpoint(ckpt_path), InMemorySource(events, BATCH), VersionStore(tmp_path / name / "models"),
                   SnapshotManager(tmp_path / name / "state"), LearnConfig(**settings))


def test_learner_from_the_first_event_trains_bit_identically_to_one_epoch_of_train(tmp_path):
    """Reservoir off: the same batches, the same step (train_window), the same weights, bit for bit
    (the guard's predictions and the publishing around the steps change nothing)."""
    events = _events()
    ckpt_path, configs = _checkpoint(tmp_path)
    learner = _learner(tmp_path, events, ckpt_path)
    result = learner.run()
    assert result.trained == len(events) and result.stopped_by == "end_of_topic"

    torch.manual_seed(0)
    reference = FELRec(ENC, MODEL)
    reference.load_state_dict(torch.load(ckpt_path, weights_only=True)["model_state"])
    store = RepresentationStore.for_cache(ENC.d_model, CACHE)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=configs.training.momentum,
                                weight_decay=configs.training.weight_decay)
    torch.manual_seed(0)  # the learner seeds its first run with learn.seed (dropout)
    train_epoch(reference, store, optimizer, events, BATCH, CACHE, seed=0)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(learner.model.state_dict()[name], tensor), name
    assert np.array_equal(learner.store.users.vectors.all().numpy(), store.users.vectors.all().numpy())


def test_the_learner_trains_in_the_checkpoints_precision_as_train_does(tmp_path, monkeypatch):
    """training.precision=bf16 in the checkpoint: the learner's steps equal one epoch of `train` in
    bf16 (the same encode_pair), bit for bit; without bf16 units it is refused as `train` refuses it."""
    import dataclasses

    from felrec_stream import device as device_module
    from felrec_stream.errors import ConfigError
    from felrec_stream.state.checkpoint import load_checkpoint

    monkeypatch.setattr(device_module, "bf16_units", lambda: "AMX")  # autocast runs on any CPU, slowly
    events = _events(320)
    ckpt_path, configs = _checkpoint(tmp_path)
    ckpt = load_checkpoint(ckpt_path)
    bf16 = dataclasses.replace(configs, training=dataclasses.replace(configs.training, precision="bf16"))
    save_checkpoint(Checkpoint(ckpt.model_state, bf16, epoch=0), tmp_path / "bf16.pt")
    learner = _learner(tmp_path, events, tmp_path / "bf16.pt")
    learner.run()
    torch.manual_seed(0)
    reference = FELRec(ENC, MODEL)
    reference.load_state_dict(ckpt.model_state)
    store = RepresentationStore.for_cache(ENC.d_model, CACHE)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=configs.training.momentum,
                                weight_decay=configs.training.weight_decay)
    torch.manual_seed(0)
    train_epoch(reference, store, optimizer, events, BATCH, CACHE, seed=0, precision="bf16")
    fp32 = _learner(tmp_path, events, ckpt_path, name="fp32")
    fp32.run()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(learner.model.state_dict()[name], tensor), name
    assert any(not torch.equal(fp32.model.state_dict()[n], t) for n, t in reference.state_dict().items())
    monkeypatch.setattr(device_module, "bf16_units", lambda: None)
    with pytest.raises(ConfigError, match="bf16"):
        _learner(tmp_path, events, tmp_path / "bf16.pt", name="refused")


def test_versions_are_published_every_n_events_with_their_position_and_parent(tmp_path):
    events = _events()
    ckpt_path, _ = _checkpoint(tmp_path)
    learner = _learner(tmp_path, events, ckpt_path, guard_tolerance=1.0)
    result = learner.run()
    versions = VersionStore(tmp_path / "run" / "models")
    manifests = versions.manifests()
    assert [m.name for m in manifests] == result.published == ["v000001", "v000002", "v000003", "v000004",
                                                               "v000005"]
    assert [m.trained_through.events for m in manifests] == [128, 256, 384, 512, 640]
    assert [m.trained_through.offsets for m in manifests] == [{0: n} for n in (128, 256, 384, 512, 640)]
    assert manifests[0].parent.startswith("checkpoint:") and [m.parent for m in manifests[1:]] == \
        [m.name for m in manifests[:-1]]
    assert versions.latest_name() == "v000005"
    last = versions.checkpoint("v000005")
    assert model_version(last.model_state, last.configs) == manifests[-1].model_version
    assert all(m.guard["events"] == 64 and 0 <= m.guard["rank"] <= 1 for m in manifests)
    position, done = versions.progress()
    assert done and position.events == len(events)


def test_a_restarted_learner_publishes_the_same_versions_as_an_uninterrupted_one(tmp_path):
    """Stop after 320 events (a clean stop: final snapshot), continue over the whole topic: the
    same weights, versions and manifests as one run (dropout and the reservoir draw random numbers)."""
    events = _events()
    ckpt_path, _ = _checkpoint(tmp_path)
    settings = {"replay_ratio": 0.5, "reservoir_size": 100, "guard_tolerance": 1.0}
    whole = _learner(tmp_path, events, ckpt_path, "whole", **settings)
    whole.run()
    _learner(tmp_path, events.slice(0, 320), ckpt_path, "parts", **settings).run()
    second = _learner(tmp_path, events, ckpt_path, "parts", **settings)
    result = second.run()
    assert result.published == ["v000003", "v000004", "v000005"]
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], tensor), name
    one, two = VersionStore(tmp_path / "whole" / "models"), VersionStore(tmp_path / "parts" / "models")
    assert [(m.model_version, m.guard) for m in one.manifests()] == [(m.model_version, m.guard)
                                                                     for m in two.manifests()]


def test_the_guard_refuses_a_worse_or_collapsed_version_and_training_goes_on(tmp_path):
    events = _events(256)
    ckpt_path, _ = _checkpoint(tmp_path)
    learner = _learner(tmp_path, events, ckpt_path, publish_every=10**6)
    learner.run()
    learner.guard.rows = [(0.6, 0.4)] * 10  # the weights of the moment rank worse than the parent
    manifest, why = learner._candidate("v000009")
    assert why is not None and why.startswith("guard:") and manifest.guard["rank"] == 0.6
    learner.guard.rows = [(0.4, 0.41)] * 10
    assert learner._candidate("v000009")[1] is None
    n = len(learner.store.users)
    learner.store.users.vectors.put(torch.arange(n), torch.ones(n, ENC.d_model))  # every user alike
    assert learner._candidate("v000009")[1].startswith("collapse:")


def test_reservoir_is_a_uniform_seeded_sample_and_resumes_exactly():
    events = EventBatch.from_table(_events(640))
    first, second = Reservoir(50, seed=1), Reservoir(50, seed=1)
    for start in range(0, 320, 32):
        first.add(events.take(slice(start, start + 32)))
        second.add(events.take(slice(start, start + 32)))
    resumed = Reservoir(50, seed=99)
    resumed.load_state_dict(second.state_dict())
    for start in range(320, 640, 32):
        first.add(events.take(slice(start, start + 32)))
        resumed.add(events.take(slice(start, start + 32)))
    assert first.seen == 640 and len(first.events) == 50
    assert list(first.events.event_id) == list(resumed.events.event_id)
    assert (first.events.event_id >= 320).sum() > 10  # later events replace earlier ones
    assert set(first.events.event_id) <= set(events.event_id)


@pytest.mark.parametrize("start", ["checkpoint", "latest"])
def test_the_first_run_starts_after_the_checkpoint_events_or_at_the_end(tmp_path, start):
    events = _events()
    ckpt_path, configs = _checkpoint(tmp_path)
    if start == "checkpoint":  # a checkpoint whose cache holds the first 320 events
        from training.train import train_epoch as epoch

        torch.manual_seed(0)
        model, store = FELRec(ENC, MODEL), RepresentationStore.for_cache(ENC.d_model, CACHE)
        epoch(model, store, torch.optim.SGD(model.parameters(), lr=0.05), events.slice(0, 320), BATCH, CACHE)
        ckpt_path = save_checkpoint(Checkpoint(model.state_dict(), configs, epoch=1, store_state=store.state_dict()),
                                    tmp_path / "trained.pt")
    learner = _learner(tmp_path, events, ckpt_path, publish_every=10**6, start=start)
    result = learner.run()
    assert result.events == len(events)
    assert result.trained == (320 if start == "checkpoint" else 0)
    assert learner.store.users.history.events == len(events)  # the cache holds every event either way
