"""SnapshotMeta: one typed reader of a snapshot's meta, with the back-compat serving needs."""

from __future__ import annotations

import dataclasses

import pytest

from felrec_stream.config import CacheConfig, ScoringConfig, to_dict
from felrec_stream.errors import ConfigError
from felrec_stream.state.meta import InvalidSnapshotMeta, SnapshotMeta
from felrec_stream.state.snapshot import LOAD_ERRORS

CACHE = to_dict(CacheConfig(history_len=8, shards=2))
WORKER_META = {  # the keys and types pipelines/worker.py `_meta()` writes
    "kind": "felrec-worker", "format": 1, "topic": "interactions", "lineage": "0123abcd",
    "topic_identity": {"topic_id": "t", "anchors": {"0": [0, 1]}}, "offsets": {"0": 41, "1": 7, "10": 3},
    "applied_events": 51, "batches": 4, "dead_letters": 1, "late_events": 0, "batch_size": 16,
    "model_version": "f" * 64, "checkpoint": "/models/m.pt", "cache": CACHE,
    "configs": {"encoder": {"d_model": 16}, "model": {}, "cache": CACHE, "scoring": {"popularity_weight": 0.5}}}


def test_round_trips_the_worker_meta():
    meta = SnapshotMeta.from_dict(WORKER_META)
    assert meta.to_dict() == WORKER_META
    assert meta.offsets == {0: 41, 1: 7, 10: 3} and meta.model_versions == ()
    assert meta.cache_config() == CacheConfig(history_len=8, shards=2)
    assert meta.cache_config({"shards": 4, "index_type": None}) == CacheConfig(history_len=8, shards=4)
    assert meta.scoring_config() == ScoringConfig(popularity_weight=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.lineage = "other"  # type: ignore[misc]


def test_model_versions_is_optional():
    swaps = [{"version": "v000001", "model_version": "ab", "applied_events": 128, "store_events": 128,
              "offsets": {"0": 128}}, {"version": "v000002", "model_version": "cd", "applied_events": 256,
                                       "store_events": 256, "offsets": {"0": 256}}]
    meta = SnapshotMeta.from_dict({**WORKER_META, "model_versions": swaps})
    assert [s.version for s in meta.model_versions] == ["v000001", "v000002"]
    assert meta.model_versions[1].offsets == {0: 256}
    assert meta.to_dict() == {**WORKER_META, "model_versions": swaps}
    with pytest.raises(InvalidSnapshotMeta):
        SnapshotMeta.from_dict({**WORKER_META, "model_versions": [{"version": "v1"}]})


def test_older_and_partial_metas():
    """Missing keys get defaults; the cache config is looked up in meta, meta["config"], meta["configs"]."""
    empty = SnapshotMeta.from_dict({})
    assert empty == SnapshotMeta() == SnapshotMeta.from_dict(None)
    assert empty.cache_config() == CacheConfig() and empty.scoring_config() == ScoringConfig()
    assert SnapshotMeta.from_dict({"config": {"cache": CACHE}}).cache == CACHE
    assert SnapshotMeta.from_dict({"configs": {"cache": CACHE}}).cache == CACHE
    assert SnapshotMeta.from_dict({"cache": "flat", "config": {"cache": CACHE}}).cache == CACHE  # not a mapping
    assert SnapshotMeta.from_dict({"lineage": 5, "configs": {"scoring": None}, "extra": 1}) == SnapshotMeta()
    assert SnapshotMeta.from_dict(SnapshotMeta(cache=CACHE).to_dict()).cache == CACHE


def test_malformed_metas_are_load_errors():
    for bad in ({"offsets": {"0": "x"}}, {"applied_events": "many"}, {"offsets": [1, 2]}, ["not", "a", "dict"]):
        with pytest.raises(InvalidSnapshotMeta) as info:
            SnapshotMeta.from_dict(bad)  # type: ignore[arg-type]
        assert isinstance(info.value, LOAD_ERRORS)  # a reader skips the snapshot for the previous one
    with pytest.raises(ConfigError, match="unknown cache option"):
        SnapshotMeta.from_dict({"cache": {"no_such_option": 1}}).cache_config()
