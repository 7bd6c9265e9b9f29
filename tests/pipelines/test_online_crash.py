"""Crash drills of online learning, as users run it (`felrec-stream learn` and `consume --models-dir`
over a real topic): the learner killed after its snapshot and before publishing, and in the middle
of a publish; the worker killed between a model swap and its snapshot. After restarts both reach
the state of an uninterrupted run: the same versions (weights and manifests), the same store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from connectors.kafka.admin import TopicAdmin
from connectors.kafka.replay import replay_events
from felrec_stream.config import KafkaConfig, WorkerConfig
from felrec_stream.faults import ENV as FAULT_ENV
from felrec_stream.state.versions import VersionStore
from pipelines.worker import build_worker, store_fingerprint
from tests.pipelines import assert_same_store, synthetic_events, write_tiny_checkpoint
from tests.pipelines.test_crash_recovery import _final_store_fingerprint

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
N_EVENTS, BATCH, PUBLISH = 1200, 64, 256


@pytest.fixture(scope="module")
def online_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "post.pt", cache_update="post_event")


@pytest.fixture(scope="module")
def topic(kafka: KafkaConfig) -> str:
    name = f"t-online-{uuid.uuid4().hex[:8]}"
    with TopicAdmin(kafka) as admin:
        admin.create_topic(name, 2)
    replay_events(synthetic_events(N_EVENTS, n_users=80, n_items=60, seed=5), kafka, name, progress=False)
    return name


def _env(tmp_path: Path, fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FELREC_HOME": str(tmp_path / "home"), "FELREC_LOG_JSON": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return env


def _cli(*args: str, env: dict[str, str]) -> tuple[int, list[dict], str]:
    proc = subprocess.run([sys.executable, "-c", "from felrec_stream.cli import main; main()", "--log-json", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    records = []
    for line in proc.stderr.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return proc.returncode, records, proc.stdout


def _learn(checkpoint, kafka, topic, models: Path, env) -> tuple[int, list[dict], str]:
    return _cli("learn", "--checkpoint", str(checkpoint), "--models-dir", str(models), "--topic", topic,
                "--bootstrap-servers", kafka.bootstrap_servers, "--from", "earliest", "--publish-every", str(PUBLISH),
                "--batch-size", str(BATCH), "--guard-tolerance", "1", "--until-end", "--device", "cpu", env=env)


def _consume(checkpoint, kafka, topic, models: Path, snapshots: Path, env) -> tuple[int, list[dict], str]:
    return _cli("consume", "--checkpoint", str(checkpoint), "--models-dir", str(models), "--topic", topic,
                "--bootstrap-servers", kafka.bootstrap_servers, "--batch-size", "48", "--snapshot-dir", str(snapshots),
                "--snapshot-every-events", "200", "--until-end", "--device", "cpu", env=env)


def _versions(models: Path) -> list[tuple[str, str, int, dict]]:
    return [(m.name, m.model_version, m.trained_through.events, dict(m.guard))
            for m in VersionStore(models).manifests()]


@pytest.fixture(scope="module")
def reference_versions(online_checkpoint, kafka, topic, tmp_path_factory):
    """One uninterrupted learner run: every version it publishes."""
    tmp = tmp_path_factory.mktemp("learn-ref")
    rc, records, out = _learn(online_checkpoint, kafka, topic, tmp / "models", _env(tmp))
    assert rc == 0, records[-3:]
    assert json.loads(out)["trained"] == N_EVENTS
    versions = _versions(tmp / "models")
    assert [v[2] for v in versions] == [256, 512, 768, 1024]
    return tmp / "models", versions


@pytest.mark.parametrize("fault", ["learner_snapshot_written@2", "version_files_written@1", "version_visible@3"])
def test_a_learner_killed_around_a_publish_restarts_to_the_same_versions(online_checkpoint, kafka, topic,
                                                                         reference_versions, tmp_path, fault):
    models = tmp_path / "models"
    rc, records, _ = _learn(online_checkpoint, kafka, topic, models, _env(tmp_path, fault))
    assert rc == -9 and records[-1]["event"] == "fault_injected", records[-3:]
    rc, records, out = _learn(online_checkpoint, kafka, topic, models, _env(tmp_path))
    assert rc == 0, records[-3:]
    assert [r for r in records if r.get("event") == "learner_restored"]  # continued from its snapshot
    assert _versions(models) == reference_versions[1]
    assert VersionStore(models).latest_name() == "v000004" and not list(models.glob(".tmp-*"))
    position, done = VersionStore(models).progress()
    assert done and position.events == N_EVENTS


def test_a_worker_killed_between_a_swap_and_its_snapshot_ends_like_an_uninterrupted_run(
        online_checkpoint, kafka, topic, reference_versions, tmp_path):
    models = reference_versions[0]
    uninterrupted = build_worker(online_checkpoint, kafka, WorkerConfig(topic, batch_size=48, until_end=True,
                                                                        models_dir=str(models)), device="cpu")
    result = uninterrupted.run()
    assert result.model_version == "v000004" and len(uninterrupted.model_history) == 4
    snapshots = tmp_path / "snap"
    rc, records, _ = _consume(online_checkpoint, kafka, topic, models, snapshots, _env(tmp_path, "model_swapped@2"))
    assert rc == -9 and records[-1]["point"] == "model_swapped", records[-3:]
    swapped = [r for r in records if r.get("event") == "model_swapped"]  # logged after the fault point
    assert [r["version"] for r in swapped] == ["v000001"]
    rc, records, out = _consume(online_checkpoint, kafka, topic, models, snapshots, _env(tmp_path))
    assert rc == 0, records[-3:]
    restored = [r for r in records if r.get("event") == "model_version_restored"]
    assert [r["version"] for r in restored] == ["v000001"]  # the snapshot before the kill named v000001
    assert json.loads(out)["model_version"] == "v000004"
    fingerprint, meta = _final_store_fingerprint(snapshots)
    assert [swap["version"] for swap in meta["model_versions"]] == ["v000001", "v000002", "v000003", "v000004"]
    assert [swap["applied_events"] for swap in meta["model_versions"]] == \
        [swap.applied_events for swap in uninterrupted.model_history]
    assert_same_store(fingerprint, store_fingerprint(uninterrupted.store))


def test_poison_records_are_skipped_by_the_learner_and_dead_lettered_by_the_worker(online_checkpoint, kafka,
                                                                                  tmp_path):
    from connectors.kafka.admin import end_offsets, new_producer

    name = f"t-online-poison-{uuid.uuid4().hex[:8]}"
    with TopicAdmin(kafka) as admin:
        admin.create_topic(name, 1)
    table = synthetic_events(300, n_users=40, n_items=30, seed=6)
    replay_events(table.slice(0, 150), kafka, name, progress=False)
    producer = new_producer(kafka)
    producer.send(name, key=b"u", value=b"not json").get(timeout=10)
    producer.close()
    replay_events(table.slice(150), kafka, name, progress=False)
    rc, records, out = _learn(online_checkpoint, kafka, name, tmp_path / "models", _env(tmp_path))
    assert rc == 0, records[-3:]
    result = json.loads(out)
    assert (result["trained"], result["poison_skipped"]) == (300, 1)
    assert not _dlq_exists(kafka, f"{name}.dlq")  # the learner sends no dead letters: the worker does
    rc, records, out = _consume(online_checkpoint, kafka, name, tmp_path / "models", tmp_path / "snap",
                                _env(tmp_path))
    assert rc == 0, records[-3:]
    summary = json.loads(out)
    assert (summary["applied_total"], summary["dead_letters"]) == (300, 1)
    assert end_offsets(kafka, f"{name}.dlq", [0])[0] == 1
    assert summary["model_version"] == "v000001"  # published at 256 events, adopted after them


def _dlq_exists(kafka: KafkaConfig, topic: str) -> bool:
    with TopicAdmin(kafka) as admin:
        return admin.topic_exists(topic)
