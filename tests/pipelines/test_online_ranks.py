"""`felrec-stream --nproc 2 learn` over a real topic: two ranks train the slices of each batch and
publish what one process publishes (within float rounding: the slices round differently), two
2-rank runs are bit-identical, and a 2-rank learner killed after its snapshot and before publishing
restarts to the versions of an uninterrupted 2-rank run, bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

from felrec_stream.state.versions import VersionStore
from tests.pipelines.test_online_crash import (N_EVENTS, _cli, _env, _versions, online_checkpoint,  # noqa: F401
                                               reference_versions, topic)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _learn_ranks(checkpoint, kafka, topic_name, models, env):
    # two ranks share the process's threads (as --nproc sets them), so their sums round the same way each run
    env = {**env, "OMP_NUM_THREADS": "1", "FELREC_PARALLEL__TIMEOUT_S": "60"}
    return _cli("--nproc", "2", "learn", "--checkpoint", str(checkpoint), "--models-dir", str(models),
                "--topic", topic_name, "--bootstrap-servers", kafka.bootstrap_servers, "--from", "earliest",
                "--publish-every", "256", "--batch-size", "64", "--guard-tolerance", "1", "--until-end",
                "--device", "cpu", env=env)


@pytest.fixture(scope="module")
def two_rank_versions(online_checkpoint, kafka, topic, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("learn-ranks")
    rc, records, out = _learn_ranks(online_checkpoint, kafka, topic, tmp / "models", _env(tmp))
    assert rc == 0, records[-3:]
    assert json.loads(out)["trained"] == N_EVENTS
    assert {r.get("dist_rank") for r in records if r.get("event") == "learn_follower_stopped"} == {1}
    return tmp / "models", _versions(tmp / "models")


def _weights(models, name: str) -> dict[str, torch.Tensor]:
    return VersionStore(models).checkpoint(name).model_state


def test_two_ranks_publish_what_one_process_publishes(two_rank_versions, reference_versions):  # noqa: F811
    ranks_dir, ranks = two_rank_versions
    one_dir, one = reference_versions
    assert [(v[0], v[2]) for v in ranks] == [(v[0], v[2]) for v in one]  # same versions, same positions
    for name, *_ in ranks:
        a, b = _weights(ranks_dir, name), _weights(one_dir, name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    for r, o in zip(ranks, one):  # the guard's figures too (the same events, near-equal weights)
        assert r[3]["events"] == o[3]["events"]
        assert r[3]["rank"] == pytest.approx(o[3]["rank"], abs=1e-3)


def test_a_two_rank_learner_killed_before_publishing_restarts_to_the_same_versions(
        online_checkpoint, kafka, topic, two_rank_versions, tmp_path):  # noqa: F811
    models = tmp_path / "models"
    rc, records, _ = _learn_ranks(online_checkpoint, kafka, topic, models, _env(tmp_path, "learner_snapshot_written@2"))
    assert rc != 0 and any(r.get("event") == "fault_injected" for r in records), records[-3:]
    assert VersionStore(models).latest_name() == "v000001"  # killed before publishing the second
    rc, records, out = _learn_ranks(online_checkpoint, kafka, topic, models, _env(tmp_path))
    assert rc == 0, records[-3:]
    assert any(r.get("event") == "learner_restored" for r in records)
    assert any(r.get("event") == "learn_follower_restored" for r in records)  # rank 1 got rank 0's state
    assert _versions(models) == two_rank_versions[1]  # bit for bit: the weights' digests are in the manifests
    position, done = VersionStore(models).progress()
    assert done and position.events == N_EVENTS
