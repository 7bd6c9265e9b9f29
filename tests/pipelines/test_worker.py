"""The streaming worker against a real broker: offline equality, dead letters (a 2 MB one too), model
guard, follow mode, a recreated topic, one worker per snapshot directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from connectors.kafka.admin import TopicAdmin, end_offsets, new_consumer, new_producer
from connectors.kafka.broker import free_port
from connectors.kafka.dlq import MAX_VALUE_BYTES, MemoryDeadLetters
from connectors.kafka.replay import replay_events
from felrec_stream.config import KafkaConfig, replace
from felrec_stream.errors import ModelError, StoreError
from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.snapshot import SnapshotManager
from felrec_stream.stream.messages import PoisonMessage
from pipelines.prometheus import WorkerMetrics
from felrec_stream.config import WorkerConfig
from pipelines.worker import build_worker, store_fingerprint
from pipelines.worker_state import CountingDeadLetters
from tests.pipelines import (assert_histories_match_table, assert_same_store, offline_replay, run_until_applied,
                             stop_with_sigterm, synthetic_events, write_tiny_checkpoint)

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
N_EVENTS, BATCH = 600, 32




@pytest.fixture(scope="module")
def stream(kafka: KafkaConfig):
    """600 synthetic events replayed into a fresh 2-partition topic."""
    table = synthetic_events(N_EVENTS)
    topic = f"t-worker-{uuid.uuid4().hex[:8]}"
    with TopicAdmin(kafka) as admin:
        admin.create_topic(topic, 2)
    replay_events(table, kafka, topic, progress=False)
    return topic, table


def test_worker_equals_offline_replay_and_exports_metrics(checkpoint, kafka, stream, tmp_path):
    topic, table = stream
    metrics, port = WorkerMetrics(), free_port()
    metrics.serve(port)
    options = WorkerConfig(topic, batch_size=BATCH, until_end=True, snapshot_every_events=200)
    worker = build_worker(checkpoint, kafka, options, shards=2, device="cpu", snapshot_dir=tmp_path / "snap",
                          metrics=metrics)
    result = worker.run()
    assert (result.applied_total, result.stopped_by, result.dead_letters) == (N_EVENTS, "end_of_topic", 0)
    assert result.snapshots >= 3

    expected = offline_replay(worker.bundle.model, table, BATCH, worker.bundle.cache)
    fingerprint = store_fingerprint(worker.store)
    assert_same_store(fingerprint, store_fingerprint(expected))  # bit-exact: same batches, same rules
    assert_histories_match_table(fingerprint, table, worker.bundle.cache.history_len)

    snapshot = SnapshotManager(tmp_path / "snap").latest_valid()
    assert snapshot.meta["offsets"] == {str(p): o for p, o in end_offsets(kafka, topic).items()}
    assert snapshot.meta["applied_events"] == N_EVENTS
    restored = make_store(16, worker.bundle.cache)
    restored.load_state_dict(snapshot.state()["store"])
    assert_same_store(store_fingerprint(restored), fingerprint)

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert f"felrec_worker_events_total {float(N_EVENTS)}" in text
    assert f'felrec_worker_cache_entities{{kind="user"}} {float(len(worker.store.users))}' in text
    assert "felrec_worker_snapshot_duration_seconds_count" in text
    assert 'felrec_worker_consumer_lag{partition="0"} 0.0' in text


def test_dead_letters_are_routed_and_worker_continues(checkpoint, kafka, tmp_path):
    table = synthetic_events(200, n_users=20, n_items=15, seed=1)
    topic = f"t-dlq-{uuid.uuid4().hex[:8]}"
    with TopicAdmin(kafka) as admin:
        admin.create_topic(topic, 1)
    replay_events(table.slice(0, 100), kafka, topic, progress=False)
    producer = new_producer(kafka)
    for value in (b"not json", b'{"v":1,"user":"u1","ts":5}', None):
        producer.send(topic, key=b"u1", value=value).get(timeout=10)
    producer.close()
    replay_events(table.slice(100), kafka, topic, progress=False)

    options = WorkerConfig(topic, batch_size=BATCH, until_end=True)
    worker = build_worker(checkpoint, kafka, options, device="cpu", snapshot_dir=tmp_path / "snap")
    result = worker.run()
    assert (result.applied_total, result.dead_letters) == (200, 3)
    assert end_offsets(kafka, kafka.dead_letter_topic, [0]) == {0: 3}
    assert SnapshotManager(tmp_path / "snap").latest_valid().meta["dead_letters"] == 3
    expected = offline_replay(worker.bundle.model, table, BATCH, worker.bundle.cache)
    assert_same_store(store_fingerprint(worker.store), store_fingerprint(expected))


def test_the_run_summary_counts_dead_letters_of_a_topic_of_only_poison(checkpoint, kafka, tmp_path):
    """No batch is ever applied: the summary still counts the 5 dead letters the snapshot and the
    dead-letter topic hold."""
    topic = f"t-poison-{uuid.uuid4().hex[:8]}"
    with TopicAdmin(kafka) as admin:
        admin.create_topic(topic, 1)
    producer = new_producer(kafka)
    for i in range(5):
        producer.send(topic, key=b"u1", value=b"not json %d" % i).get(timeout=10)
    producer.close()
    kafka = replace(kafka, dead_letter_topic=f"dlq-{uuid.uuid4().hex[:8]}")
    options = WorkerConfig(topic, batch_size=BATCH, until_end=True)
    result = build_worker(checkpoint, kafka, options, device="cpu", snapshot_dir=tmp_path / "snap").run()
    assert (result.applied_total, result.dead_letters) == (0, 5)
    assert SnapshotManager(tmp_path / "snap").latest_valid().meta["dead_letters"] == 5
    assert end_offsets(kafka, kafka.dead_letter_topic, [0]) == {0: 5}


def test_snapshot_of_another_model_is_refused(checkpoint, kafka, stream, tmp_path):
    topic, _ = stream
    snap = tmp_path / "snap"
    first = build_worker(checkpoint, kafka, WorkerConfig(topic, batch_size=BATCH, until_end=True, max_events=64),
                         device="cpu", snapshot_dir=snap).run()
    assert first.applied_total == 64
    other = write_tiny_checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(ModelError, match="allow-model-change"):
        build_worker(other, kafka, WorkerConfig(topic, batch_size=BATCH, until_end=True), device="cpu",
                     snapshot_dir=snap).run()
    allowed = WorkerConfig(topic, batch_size=BATCH, until_end=True, max_events=32, allow_model_change=True)
    worker = build_worker(other, kafka, allowed, device="cpu", snapshot_dir=snap)
    result = worker.run()
    assert result.restored_seq is not None and result.applied_total == 96


def test_follow_mode_applies_everything_and_stops_gracefully(checkpoint, kafka, stream, tmp_path):
    topic, _ = stream
    options = WorkerConfig(topic, batch_size=BATCH, max_wait_ms=20, snapshot_every_events=10**6)
    worker = build_worker(checkpoint, kafka, options, device="cpu", snapshot_dir=tmp_path / "snap")
    thread, results = run_until_applied(worker, N_EVENTS)
    worker.request_stop("test")
    thread.join(30)
    assert results and results[0].stopped_by == "test" and results[0].applied_total == N_EVENTS
    snapshot = SnapshotManager(tmp_path / "snap").latest_valid()  # the final snapshot of the graceful stop
    assert snapshot.meta["applied_events"] == N_EVENTS
    assert int(store_fingerprint(worker.store)["user_counts"].sum()) == N_EVENTS


def test_cli_follow_mode_serves_queries_exports_metrics_and_stops_on_sigterm(checkpoint, kafka, stream, tmp_path):
    topic, table = stream
    http_port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-c", "from felrec_stream.cli import main; main()", "--log-json", "consume",
               "--topic", topic, "--checkpoint", str(checkpoint), "--bootstrap-servers", kafka.bootstrap_servers,
               "--batch-size", str(BATCH), "--max-wait-ms", "20", "--snapshot-dir", str(tmp_path / "snap"),
               "--device", "cpu", "--metrics-port", str(metrics_port), "--serve", "--http-port", str(http_port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FELREC_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        for line in proc.stderr:  # until every event is applied (follow mode never stops by itself)
            if '"batch_applied"' in line and json.loads(line)["applied"] == N_EVENTS:
                break
        user = table.column("user")[0].as_py()
        base = f"http://127.0.0.1:{http_port}"
        recommendations = json.load(urllib.request.urlopen(f"{base}/v1/users/{user}/recommendations?k=5", timeout=10))
        assert len(recommendations["results"]) == 5
        catalog = json.load(urllib.request.urlopen(f"{base}/v1/catalog", timeout=10))
        assert catalog["users"] == len(set(table.column("user").to_pylist()))
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert f"felrec_worker_events_total {float(N_EVENTS)}" in text
        summary = stop_with_sigterm(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (summary["stopped_by"], summary["applied_total"]) == ("signal:SIGTERM", N_EVENTS)
    assert SnapshotManager(tmp_path / "snap").latest_valid().meta["applied_events"] == N_EVENTS


def test_dead_letter_count_covers_only_messages_behind_the_positions():
    memory = MemoryDeadLetters()
    sink = CountingDeadLetters(lambda: memory)
    for partition, offset in ((0, 5), (1, 3), (0, 9)):
        sink.send(PoisonMessage("not_json", None, "bad", b"x", partition=partition, offset=offset))
    assert sink.settle({0: 6, 1: 3}) == 1  # offset 3 is the next to read on partition 1: not passed yet
    assert sink.settle({0: 10, 1: 4}) == 3
    assert (sink.sent, len(memory.messages)) == (3, 3)


def test_a_record_over_a_megabyte_is_dead_lettered_truncated_and_the_worker_goes_on(checkpoint, kafka, tmp_path):
    table = synthetic_events(120, n_users=20, n_items=15, seed=4)
    topic = f"t-big-{uuid.uuid4().hex[:8]}"
    kafka = replace(kafka, dead_letter_topic=f"{topic}.dlq")  # this test's dead letters only
    with TopicAdmin(kafka) as admin:
        admin.create_topic(topic, 1)
    replay_events(table.slice(0, 60), kafka, topic, progress=False)
    big = b'{"v":1,"user":"u1","item":"' + b"x" * (2 << 20) + b'","ts":5}'
    producer = new_producer(kafka, max_request_size=4 << 20)  # the broker takes it; the DLQ producer must too
    producer.send(topic, key=b"u1", value=big).get(timeout=10)
    producer.close()
    replay_events(table.slice(60), kafka, topic, progress=False)

    worker = build_worker(checkpoint, kafka, WorkerConfig(topic, batch_size=BATCH, until_end=True), device="cpu",
                          snapshot_dir=tmp_path / "snap")
    result = worker.run()
    assert (result.applied_total, result.dead_letters) == (120, 1)
    expected = offline_replay(worker.bundle.model, table, BATCH, worker.bundle.cache)
    assert_same_store(store_fingerprint(worker.store), store_fingerprint(expected))

    letter = _read_one(kafka, kafka.dead_letter_topic)
    headers = {name: value.decode() for name, value in letter.headers}
    assert len(letter.value) == MAX_VALUE_BYTES and big.startswith(letter.value)
    assert (headers["felrec.kind"], headers["felrec.original.size"], headers["felrec.truncated"]) == \
        ("oversized", str(len(big)), "true")
    assert (headers["felrec.source.topic"], headers["felrec.source.offset"]) == (topic, "60")


def _read_one(kafka: KafkaConfig, topic: str):
    from kafka import TopicPartition

    consumer = new_consumer(kafka)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            records = consumer.poll(timeout_ms=200).get(tp)
            if records:
                return records[0]
    finally:
        consumer.close()
    raise AssertionError(f"nothing on {topic}")


def test_a_recreated_topic_is_refused_and_reset_state_starts_over(checkpoint, kafka, tmp_path):
    old, new = synthetic_events(200, seed=5), synthetic_events(400, seed=6)
    topic = f"t-recreated-{uuid.uuid4().hex[:8]}"
    with TopicAdmin(kafka) as admin:
        admin.create_topic(topic, 2)
    replay_events(old, kafka, topic, progress=False)
    snap = tmp_path / "snap"
    build_worker(checkpoint, kafka, WorkerConfig(topic, batch_size=BATCH, until_end=True, max_events=96),
                 device="cpu", snapshot_dir=snap).run()
    with TopicAdmin(kafka) as admin:  # another dataset under the same name, more events than the offsets
        admin.recreate_topic(topic, 2)
    replay_events(new, kafka, topic, progress=False)

    options = WorkerConfig(topic, batch_size=BATCH, until_end=True)
    refused = build_worker(checkpoint, kafka, options, device="cpu", snapshot_dir=snap)
    with pytest.raises(StoreError, match="deleted and recreated.*--reset-state"):
        refused.run()
    assert refused.progress.applied == 0 and len(refused.store.users) == 0

    reset = build_worker(checkpoint, kafka, replace(options, reset_state=True), device="cpu", snapshot_dir=snap)
    result = reset.run()
    assert (result.restored_seq, result.applied_total) == (None, len(new))
    expected = offline_replay(reset.bundle.model, new, BATCH, reset.bundle.cache)
    assert_same_store(store_fingerprint(reset.store), store_fingerprint(expected))  # nothing of the old topic
    again = build_worker(checkpoint, kafka, options, device="cpu", snapshot_dir=snap).run()  # the new state fits
    assert (again.applied_this_run, again.applied_total) == (0, len(new))


def test_one_worker_per_snapshot_directory_for_its_whole_life(checkpoint, kafka, stream, tmp_path):
    topic, _ = stream
    options = WorkerConfig(topic, batch_size=BATCH, max_wait_ms=20, snapshot_every_events=10**6)
    first = build_worker(checkpoint, kafka, options, device="cpu", snapshot_dir=tmp_path / "snap")
    thread, results = run_until_applied(first, N_EVENTS)
    try:
        assert first.progress.applied == N_EVENTS  # idle now: between snapshot writes
        second = build_worker(checkpoint, kafka, replace(options, until_end=True), device="cpu",
                              snapshot_dir=tmp_path / "snap")
        with pytest.raises(StoreError, match="in use by another writer"):
            second.run()
        assert second.progress.applied == 0
    finally:
        first.request_stop("test")
        thread.join(30)
    assert results and results[0].applied_total == N_EVENTS
