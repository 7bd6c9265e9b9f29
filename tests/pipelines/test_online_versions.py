"""The worker adopts the versions the online learner publishes (pipelines/adoption.py): between
batches, only once every event a version was trained on is applied, the same ones at the same
batches after a restart, and the version a snapshot names on restore."""

import threading

import numpy as np
import pytest
import torch

from felrec_stream.config import CacheConfig, Configs, EncoderConfig, LearnConfig, ModelConfig, TrainingConfig, \
    WorkerConfig
from felrec_stream.errors import ModelError
from felrec_stream.model.felrec import FELRec
from felrec_stream.state.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.engine import encode_sequences, infer_batch, stored_sequences
from felrec_stream.state.snapshot import SnapshotManager
from felrec_stream.state.store import Kind
from felrec_stream.state.versions import Position, VersionManifest, VersionStore, model_version, shape_digest
from felrec_stream.stream.events import iter_batches
from felrec_stream.stream.source import InMemorySource
from pipelines.model import load_model
from pipelines.worker import StreamWorker, store_fingerprint
from tests.pipelines import assert_same_store, synthetic_events
from training.learn import Learner

N_EVENTS, LEARN_BATCH, BATCH, PUBLISH = 640, 32, 48, 128
TOPIC = "online"
ENC = EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0, output_norm="running")
MODEL = ModelConfig(use_mlp=False, temperature=0.5, queue_size=64, cache_update="post_event", mask_own_negatives=True)
CONFIGS = Configs(encoder=ENC, model=MODEL, cache=CacheConfig(history_len=8),
                  training=TrainingConfig(batch_size=LEARN_BATCH, lr=0.05))


@pytest.fixture(scope="module")
def table():
    return synthetic_events(N_EVENTS)


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(Checkpoint(FELRec(ENC, MODEL).state_dict(), CONFIGS, epoch=0),
                           tmp_path_factory.mktemp("ckpt") / "init.pt")


def _learn(table, initial, models, state):
    config = LearnConfig(topic=TOPIC, start="earliest", publish_every=PUBLISH, guard_tolerance=1.0, until_end=True)
    return Learner(load_checkpoint(initial), InMemorySource(table, LEARN_BATCH), VersionStore(models),
                   SnapshotManager(state), config).run()


@pytest.fixture(scope="module")
def models(table, initial, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    result = _learn(table, initial, root / "models", root / "learner")
    assert result.published == ["v000001", "v000002", "v000003", "v000004", "v000005"]
    return root / "models"


def _worker(initial, source, models, snapshot_dir, **options):
    bundle = load_model(initial)
    config = WorkerConfig(TOPIC, batch_size=BATCH, until_end=True, models_dir=str(models), **options)
    snapshots = None if snapshot_dir is None else SnapshotManager(snapshot_dir)
    return StreamWorker(bundle, make_store(bundle.dim, bundle.cache), source, config, snapshots)


@pytest.fixture(scope="module")
def reference(table, initial, models):
    """Offline: batches of BATCH; before each, the newest version trained through at most the
    events applied so far (the checkpoint until the first)."""
    versions = VersionStore(models)
    manifests = versions.manifests()
    model = load_model(initial).model
    store = make_store(ENC.d_model, CONFIGS.cache)
    applied, in_use, switches = 0, 0, []
    for batch in iter_batches(table, BATCH):
        due = [m for m in manifests if m.trained_through.events <= applied and m.seq > in_use]
        if due:
            in_use = due[-1].seq
            model = load_model(versions.weights_path(due[-1].name)).model
            switches.append((due[-1].name, applied))
        infer_batch(model, store, batch, CONFIGS.cache)
        applied += len(batch)
    return store_fingerprint(store), switches


def test_versions_are_adopted_only_after_every_event_they_were_trained_on(table, initial, models, reference,
                                                                         tmp_path):
    worker = _worker(initial, InMemorySource(table, BATCH), models, tmp_path / "snap")
    in_use = []  # (version in use, events applied before the batch)
    apply = worker.apply
    worker.apply = lambda batch: (in_use.append((worker.bundle.version, worker.progress.applied)), apply(batch))
    result = worker.run()
    trained_through = {m.model_version: m.trained_through.events for m in VersionStore(models).manifests()}
    for version, applied in in_use:  # no event is encoded or scored by weights trained on it
        assert trained_through.get(version, 0) <= applied
    assert [(swap.version, swap.applied_events) for swap in worker.model_history] == \
        reference[1] + [("v000005", N_EVENTS)]  # the last one lands after the last batch
    assert result.model_version == "v000005"
    assert_same_store(store_fingerprint(worker.store), reference[0])
    meta = SnapshotManager(tmp_path / "snap").latest_valid().meta
    assert [h["version"] for h in meta["model_versions"]] == [swap.version for swap in worker.model_history]
    assert meta["model_version"] == worker.bundle.version == VersionStore(models).manifest("v000005").model_version


def test_a_restart_restores_the_version_its_snapshot_names_and_ends_like_one_run(table, initial, models, reference,
                                                                                tmp_path):
    first = _worker(initial, InMemorySource(table, BATCH), models, tmp_path / "snap", max_events=200)
    first.run()
    assert first.model_history[-1].version == "v000001"
    second = _worker(initial, InMemorySource(table, BATCH), models, tmp_path / "snap")
    result = second.run()
    assert second.restored_seq is not None and result.model_version == "v000005"
    assert_same_store(store_fingerprint(second.store), reference[0])
    # without the models directory the snapshot's version cannot load: refused, never the checkpoint
    bundle = load_model(initial)
    third = StreamWorker(bundle, make_store(bundle.dim, bundle.cache), InMemorySource(table, BATCH),
                         WorkerConfig(TOPIC, batch_size=BATCH, until_end=True), SnapshotManager(tmp_path / "snap"))
    with pytest.raises(ModelError, match="give the --models-dir"):
        third.run()


def test_until_end_waits_for_the_learner_so_a_run_is_reproducible(table, initial, reference, tmp_path):
    """The worker starts before the learner has decided anything: it waits at each boundary and
    ends exactly like the run whose versions were all published beforehand."""
    worker = _worker(initial, InMemorySource(table, BATCH), tmp_path / "models", None)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        _learn(table, initial, tmp_path / "models", tmp_path / "learner")
    finally:
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert_same_store(store_fingerprint(worker.store), reference[0])


def test_a_version_of_another_shape_is_refused_and_the_worker_keeps_its_weights(table, initial, tmp_path):
    other = Configs(encoder=EncoderConfig(d_model=8, n_layers=1, n_heads=2, d_ff=16), model=MODEL,
                    cache=CONFIGS.cache)
    state = FELRec(other.encoder, other.model).state_dict()
    versions = VersionStore(tmp_path / "models")
    versions.publish(Checkpoint(state, other, epoch=0),
                     VersionManifest("v000001", 1, "checkpoint:x", Position(64, {0: 64}),
                                     model_version(state, other), shape_digest(other)))
    versions.record_progress(Position(N_EVENTS, {0: N_EVENTS}), done=True)
    worker = _worker(initial, InMemorySource(table, BATCH), tmp_path / "models", None)
    result = worker.run()
    assert result.model_version == "" and worker.bundle.version == load_model(initial).version
    assert result.applied_total == N_EVENTS


def test_stale_vectors_are_counted_and_backfill_re_encodes_the_most_popular_items(table, initial, models, tmp_path):
    plain = _worker(initial, InMemorySource(table.slice(0, 192), BATCH), models, None)
    plain.run()
    assert plain.model_history and plain.stale_share["item"] > 0.3
    filled = _worker(initial, InMemorySource(table.slice(0, 192), BATCH), models, None, backfill=10)
    checked = []
    backfill = filled._backfill

    def checked_backfill():  # a backfilled vector is what the item's next event would read now
        before = filled._backfilled.copy()
        backfill()
        new = np.flatnonzero(filled._backfilled[: len(before)] & ~before)
        if len(new):
            with torch.no_grad():
                expected = encode_sequences(filled.bundle.model, stored_sequences(
                    filled.store, Kind.ITEM, new, "cpu", filled.bundle.cache))
            torch.testing.assert_close(filled.store.items.vectors.get(torch.from_numpy(new)), expected,
                                       rtol=1e-5, atol=1e-6)
            checked.append(len(new))

    filled._backfill = checked_backfill
    filled.run()
    assert filled.stale_share["item"] < plain.stale_share["item"]
    assert checked and max(checked) == 10  # K per batch, the most popular stale ones first


def test_a_serve_replica_encodes_unknown_users_with_the_version_its_snapshot_names(table, initial, models, tmp_path):
    from felrec_stream.serving.query import ColdStartEncoder, NotFound
    from felrec_stream.serving.snapshots import engine_from_snapshot

    worker = _worker(initial, InMemorySource(table.slice(0, 320), BATCH), models, tmp_path / "snap")
    worker.run()
    snapshot = SnapshotManager(tmp_path / "snap").latest_valid()
    engine = engine_from_snapshot(snapshot, models=VersionStore(models))
    answer = engine.recommend("a-user-never-seen", k=5)
    version = load_model(VersionStore(models).weights_path(worker.model_history[-1].version))
    expected = ColdStartEncoder(version.model, version.cache)("a-user-never-seen")
    assert answer.cold_start and answer.results
    np.testing.assert_allclose(engine.cold_start("a-user-never-seen"), expected, rtol=1e-6)
    initial_vector = ColdStartEncoder(load_model(initial).model, version.cache)("a-user-never-seen")
    assert not np.allclose(expected, initial_vector)  # the version's weights, not the checkpoint's
    with pytest.raises(NotFound):
        engine_from_snapshot(snapshot).recommend("a-user-never-seen", k=5)  # no models: no encoder


def test_garbage_collection_keeps_every_version_a_worker_snapshot_names(table, initial, models, tmp_path):
    import shutil

    own = tmp_path / "models"
    shutil.copytree(models, own)
    shutil.rmtree(own / "pins", ignore_errors=True)  # the other tests' workers pinned every version
    worker = _worker(initial, InMemorySource(table.slice(0, 400), BATCH), own, tmp_path / "snap")
    worker.run()
    named = [swap.version for swap in worker.model_history]
    assert named == ["v000001", "v000002", "v000003"]
    deleted = VersionStore(own).collect(keep=1)  # what the learner does after each publish
    assert deleted == ["v000004"]  # neither pinned by the snapshots nor LATEST (v000005)
    assert set(named) <= set(VersionStore(own).names())
    restarted = _worker(initial, InMemorySource(table, BATCH), own, tmp_path / "snap")
    assert restarted.run().model_version == "v000005"  # the snapshot's version still loads
