"""Published weight versions (felrec_stream/state/versions.py): immutable folders, the atomic
pointer, progress, pins and garbage collection."""

import pytest
import torch

from felrec_stream.config import CacheConfig, Configs, EncoderConfig, ModelConfig
from felrec_stream.errors import ModelError
from felrec_stream.model.felrec import FELRec
from felrec_stream.state.checkpoint import Checkpoint
from felrec_stream.state.versions import Position, VersionManifest, VersionStore, model_version, shape_digest

CONFIGS = Configs(encoder=EncoderConfig(d_model=8, n_layers=1, n_heads=2, d_ff=16), model=ModelConfig(queue_size=16),
                  cache=CacheConfig(history_len=4))


def _publish(store: VersionStore, seq: int, seed: int = 0) -> VersionManifest:
    torch.manual_seed(seed)
    state = FELRec(CONFIGS.encoder, CONFIGS.model).state_dict()
    manifest = VersionManifest(f"v{seq:06d}", seq, "checkpoint:x", Position(100 * seq, {0: 100 * seq}),
                               model_version(state, CONFIGS), shape_digest(CONFIGS), {"rank": 0.3})
    store.publish(Checkpoint(state, CONFIGS, epoch=0), manifest)
    return manifest


def test_publish_makes_a_readable_version_and_moves_the_pointer_forward_only(tmp_path):
    store = VersionStore(tmp_path)
    first = _publish(store, 1)
    assert store.latest_name() == "v000001" and store.manifest("v000001") == first
    checkpoint = store.checkpoint("v000001")
    assert model_version(checkpoint.model_state, checkpoint.configs) == first.model_version
    _publish(store, 2, seed=1)
    _publish(store, 1)  # a restarted learner publishing an old decision again: idempotent, pointer stays
    assert store.latest_name() == "v000002" and store.names() == ["v000001", "v000002"]


def test_a_crashed_publish_is_invisible_and_cleaned(tmp_path):
    store = VersionStore(tmp_path)
    (tmp_path / ".tmp-v000003").mkdir()
    (tmp_path / ".tmp-v000003" / "weights.pt").write_bytes(b"half")
    assert store.names() == [] and store.latest_name() is None
    store.clean_partial()
    assert not (tmp_path / ".tmp-v000003").exists()
    with pytest.raises(ModelError, match="is not in"):
        store.manifest("v000003")


def test_progress_never_moves_backwards(tmp_path):
    store = VersionStore(tmp_path)
    assert store.progress() == (Position(), False)
    store.record_progress(Position(300, {0: 300}))
    store.record_progress(Position(200, {0: 200}))  # a restarted learner re-training from its snapshot
    assert store.progress() == (Position(300, {0: 300}), False)
    store.record_progress(Position(300, {0: 300}), done=True)
    assert store.progress() == (Position(300, {0: 300}), True)


def test_collect_keeps_the_newest_the_pointer_and_every_pinned_version(tmp_path):
    store = VersionStore(tmp_path)
    for seq in range(1, 7):
        _publish(store, seq, seed=seq)
    a, b, gone = (tmp_path / name for name in ("snap-a", "snap-b", "snap-gone"))
    a.mkdir()
    b.mkdir()
    store.pin(str(a), ["v000002"])
    store.pin(str(b), ["v000001", "v000002"])
    store.pin(str(b), ["v000003"])  # the same owner replaces its pins
    store.pin(str(gone), ["v000004"])  # an owner whose snapshot directory was deleted pins nothing
    deleted = store.collect(keep=2)
    assert deleted == ["v000001", "v000004"]
    assert store.names() == ["v000002", "v000003", "v000005", "v000006"]


def test_positions_are_reached_per_partition():
    position = Position(10, {0: 5, 1: 7})
    assert position.reached_by({0: 5, 1: 8})
    assert not position.reached_by({0: 6, 1: 6})
    assert not position.reached_by({0: 9})
    assert Position.from_dict(position.to_dict()) == position
