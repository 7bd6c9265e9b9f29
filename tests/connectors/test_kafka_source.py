"""Ordered source: exact event-time merge, late events, dead letters, exact restart positions."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest

from connectors.kafka.admin import TopicAdmin, new_consumer, new_producer
from connectors.kafka.dlq import MemoryDeadLetters
from connectors.kafka.replay import replay_events
from connectors.kafka.source import KafkaSource, read_topic_table
from felrec_stream.config import replace
from felrec_stream.errors import KafkaError
from felrec_stream.stream.events import EventBatch, is_time_ordered, make_events
from felrec_stream.stream.messages import encode_event
from tests.felrec_stream.stream.test_messages import POISON_CASES


# ------------------------------------------------------------------------------- with a broker
def _topic(kafka_config, name, partitions):
    with TopicAdmin(kafka_config) as admin:
        admin.create_topic(name, partitions)
    return name


def _produce_raw(kafka_config, topic, messages):
    """messages: (partition, key, value) triples, sent in order."""
    producer = new_producer(kafka_config, linger_ms=5, max_request_size=1 << 21)
    futures = [producer.send(topic, key=key, value=value, partition=p) for p, key, value in messages]
    producer.flush()
    producer.close()
    return [f.get() for f in futures]


def _skewed_events(n=4000, seed=0):
    """Users with very different activity periods: partitions cover different time ranges."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 40, n)
    ts = np.sort(rng.integers(0, 10**6, n))
    users = np.where(ts < 3 * 10**5, users % 5, users)  # the early period belongs to 5 users
    return make_events(users, rng.integers(0, 30, n), ts)


def _concat(batches: list[EventBatch]) -> pa.Table:
    return pa.concat_tables([b.to_table() for b in batches]) if batches else None


@pytest.mark.kafka
def test_multi_partition_topic_is_read_back_in_exact_event_time_order(kafka_config, topic_name):
    table = _skewed_events()
    _topic(kafka_config, topic_name, 4)
    replay_events(table, kafka_config, topic_name, progress=False)
    config = replace(kafka_config, reorder_window=8)  # small window: forces pausing busy partitions
    with KafkaSource(config, topic_name, batch_size=300) as source:
        batches = list(source.batches())
        assert source.stats.late == 0 and source.stats.poison == 0 and source.stats.released_early == 0
    assert all(0 < len(b) <= 300 for b in batches)
    read = _concat(batches)
    assert is_time_ordered(read) and read.equals(table)


@pytest.mark.kafka
def test_late_events_are_counted_and_still_processed(kafka_config, topic_name):
    _topic(kafka_config, topic_name, 2)
    p0 = [(0, *encode_event("a", f"i{t}", t, t)) for t in range(1, 101)]
    p1 = [(1, *encode_event("b", f"j{t}", t, 1000 + t)) for t in (50, 60, 5, 70)]  # ts 5 arrives late
    _produce_raw(kafka_config, topic_name, p0 + p1)
    with KafkaSource(kafka_config, topic_name, batch_size=64) as source:
        read = _concat(list(source.batches()))
        assert source.stats.late == 1 and source.stats.events == 104
    assert sorted(read.column("event_id").to_pylist()) == sorted(list(range(1, 101)) + [1050, 1060, 1005, 1070])
    ids = read.column("event_id").to_pylist()
    assert ids.index(1005) == ids.index(1060) + 1  # emitted right after its predecessor in the partition


@pytest.mark.kafka
def test_follow_mode_releases_past_an_idle_partition_and_counts_late_arrivals(kafka_config, topic_name):
    _topic(kafka_config, topic_name, 2)
    _produce_raw(kafka_config, topic_name, [(0, *encode_event("a", "i", t, t)) for t in range(100, 150)])
    config = replace(kafka_config, reorder_window=5)
    source = KafkaSource(config, topic_name, until_end=False, batch_size=10, max_wait_s=0.05, max_delay_s=0.3)
    with source:
        got = _read_until(source, 45)
        assert got >= 45  # all but (at most) the window released although partition 1 is idle
        _produce_raw(kafka_config, topic_name, [(1, *encode_event("b", "j", 10, 10))])  # older than all
        got += _read_until(source, 51 - got)
        assert got == 51 and source.stats.late == 1 and source.stats.released_early >= 45


def _read_until(source, n, timeout_s=10.0):
    got, deadline = 0, time.monotonic() + timeout_s
    while got < n and time.monotonic() < deadline:
        batch = source.poll_batch(0.1)
        got += len(batch) if batch is not None else 0
    return got


@pytest.mark.kafka
def test_malformed_messages_go_to_the_dead_letter_topic_and_valid_ones_are_processed(kafka_config, topic_name):
    _topic(kafka_config, topic_name, 2)
    messages = []
    for i, case in enumerate(POISON_CASES):
        key = case[4] if len(case) > 4 else None
        messages.append((i % 2, *encode_event(f"u{i}", "i", 1000 + i, i)))  # valid neighbour
        # tombstones need a key
        messages.append((i % 2, key if key is not None or case[1] is not None else b"k", case[1]))
    sent = _produce_raw(kafka_config, topic_name, messages)
    with KafkaSource(kafka_config, topic_name) as source:  # default sink: the dead-letter topic
        read = _concat(list(source.batches()))
        assert source.stats.poison == len(POISON_CASES)
        source.positions()  # flushes the dead letters
    assert read.column("event_id").to_pylist() == list(range(len(POISON_CASES)))

    letters = _read_all(kafka_config, kafka_config.dead_letter_topic, len(POISON_CASES))
    expected = {(m.partition, m.offset): (case, raw[2]) for m, case, raw in
                zip(sent[1::2], POISON_CASES, messages[1::2])}
    assert len(letters) == len(POISON_CASES) >= 40
    kinds = set()
    for record in letters:
        headers = {k: v.decode() for k, v in record.headers}
        where = (int(headers["felrec.source.partition"]), int(headers["felrec.source.offset"]))
        case, raw = expected[where]
        assert headers["felrec.source.topic"] == topic_name
        assert headers["felrec.kind"] == case[2] and headers["felrec.reason"]
        assert record.value == raw
        kinds.add(case[2])
    assert len(kinds) >= 20


def _read_all(kafka_config, topic, n, timeout_s=10.0):
    from kafka import TopicPartition

    consumer = new_consumer(kafka_config)
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=100).values():
            out.extend(records)
    consumer.close()
    return out


@pytest.mark.kafka
def test_restart_from_positions_neither_loses_nor_repeats(kafka_config, topic_name):
    table = _skewed_events(3000, seed=1)
    _topic(kafka_config, topic_name, 3)
    replay_events(table, kafka_config, topic_name, progress=False)
    _produce_raw(kafka_config, topic_name, [(1, None, b"not json"), (2, b"k", None)])  # poison at the end
    config = replace(kafka_config, reorder_window=16)
    first: list[EventBatch] = []
    sink = MemoryDeadLetters()
    with KafkaSource(config, topic_name, batch_size=128, dead_letters=sink) as source:
        for batch in source.batches():
            first.append(batch)
            if len(first) == 7:
                positions = source.positions()  # events held in the merge buffer are not included
                break
    assert sum(len(b) for b in first) == 7 * 128
    with KafkaSource(config, topic_name, batch_size=500, dead_letters=sink).open(positions) as source:
        second = list(source.batches())
        end_positions = source.positions()
    assert pa.concat_tables([_concat(first), _concat(second)]).equals(table)
    # Dead letters are at-least-once: the first run decoded them before its positions.
    assert len({(m.partition, m.offset) for m in sink.messages}) == 2
    assert {m.kind for m in sink.messages} == {"not_json", "tombstone"}
    with KafkaSource(config, topic_name, dead_letters=sink).open(end_positions) as source:
        assert list(source.batches()) == []  # nothing left, nothing repeated


@pytest.mark.kafka
def test_read_topic_table_equals_the_source_table(kafka_config, topic_name):
    table = _skewed_events(2500, seed=2)
    _topic(kafka_config, topic_name, 3)
    replay_events(table, kafka_config, topic_name, progress=False)
    assert read_topic_table(kafka_config, topic_name).equals(table)


@pytest.mark.kafka
def test_read_topic_table_drops_events_a_resumed_replay_wrote_twice(kafka_config, topic_name):
    table = _skewed_events(500, seed=3)
    _topic(kafka_config, topic_name, 2)
    replay_events(table.slice(0, 300), kafka_config, topic_name, progress=False)
    replay_events(table, kafka_config, topic_name, start_from=250, progress=False)  # 250..299 twice
    assert read_topic_table(kafka_config, topic_name).equals(table)


@pytest.mark.kafka
def test_historical_read_stops_at_the_end_captured_at_open(kafka_config, topic_name):
    _topic(kafka_config, topic_name, 1)
    _produce_raw(kafka_config, topic_name, [(0, *encode_event("a", "i", t, t)) for t in range(10)])
    with KafkaSource(kafka_config, topic_name, batch_size=4) as source:
        first = source.poll_batch(1.0)
        _produce_raw(kafka_config, topic_name, [(0, *encode_event("a", "i", t, t)) for t in range(10, 20)])
        rest = list(source.batches())
        assert len(first) + sum(len(b) for b in rest) == 10
        assert source.positions() == {0: 10}


@pytest.mark.kafka
def test_commit_is_for_monitoring_and_uses_the_positions(kafka_config, topic_name):
    from kafka import TopicPartition

    _topic(kafka_config, topic_name, 1)
    _produce_raw(kafka_config, topic_name, [(0, *encode_event("a", "i", t, t)) for t in range(10)])
    group = f"g-{topic_name}"
    with KafkaSource(kafka_config, topic_name, group_id=group, batch_size=4) as source:
        source.poll_batch(1.0)
        source.commit()
    consumer = new_consumer(kafka_config, group_id=group)
    try:
        assert consumer.committed(TopicPartition(topic_name, 0)) == 4
    finally:
        consumer.close(autocommit=False)


@pytest.mark.kafka
def test_missing_topic_and_impossible_positions_are_clear_errors(kafka_config, topic_name):
    import threading

    def io_threads() -> int:
        return sum(t.name.startswith("kafka-io") for t in threading.enumerate())

    before = io_threads()
    with pytest.raises(KafkaError, match="does not exist"):
        KafkaSource(kafka_config, topic_name).open()
    _topic(kafka_config, topic_name, 1)
    with pytest.raises(KafkaError, match="outside the available offsets"):
        KafkaSource(kafka_config, topic_name).open({0: 5})
    assert io_threads() == before  # a failed open closes its consumer


@pytest.mark.kafka
@pytest.mark.embedded_unsupported
def test_aborted_transactions_are_not_events(kafka_config, topic_name):
    """Tansu ignores read_committed; on Apache Kafka aborted records must never become events."""
    _topic(kafka_config, topic_name, 1)
    producer = new_producer(kafka_config, transactional_id=f"tx-{topic_name}")
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(topic_name, *reversed(encode_event("a", "aborted", 1, 1)))
    producer.abort_transaction()
    producer.begin_transaction()
    key, value = encode_event("a", "kept", 2, 2)
    producer.send(topic_name, key=key, value=value)
    producer.commit_transaction()
    producer.close()
    table = read_topic_table(kafka_config, topic_name)
    assert table.column("item").to_pylist() == ["kept"]



@pytest.mark.kafka
def test_an_event_far_in_the_future_is_dead_lettered_instead_of_making_later_events_late(kafka_config, topic_name):
    _topic(kafka_config, topic_name, 1)
    now = int(time.time())
    events = [encode_event("a", f"i{n}", now - 100 + n, n) for n in range(5)]
    events.append(encode_event("a", "from-the-future", now + 10 * 365 * 86400, 5))  # a clock set ten years ahead
    events += [encode_event("a", f"j{n}", now - 50 + n, 6 + n) for n in range(5)]
    _produce_raw(kafka_config, topic_name, [(0, *e) for e in events])
    sink = MemoryDeadLetters()
    source = KafkaSource(kafka_config, topic_name, until_end=False, batch_size=100, max_wait_s=0.05, dead_letters=sink)
    with source:
        assert _read_until(source, 10) == 10
        assert source.stats.late == 0  # one accepted future event would make all 5 later ones late
    assert [(m.kind, m.field, m.offset) for m in sink.messages] == [("future_timestamp", "ts", 5)]


@pytest.mark.kafka
def test_identity_tells_a_recreated_topic_apart_even_without_topic_ids(kafka_config, topic_name):
    table = _skewed_events(300, seed=4)
    _topic(kafka_config, topic_name, 2)
    replay_events(table, kafka_config, topic_name, progress=False)
    with KafkaSource(kafka_config, topic_name, dead_letters=MemoryDeadLetters()) as source:
        list(source.batches())
        identity = source.identity()
    assert identity["topic_id"] and sorted(identity["anchors"]) == ["0", "1"]
    anchors_only = {**identity, "topic_id": None}  # as from a broker without topic ids
    assert KafkaSource(kafka_config, topic_name).verify_identity(identity) is None
    assert KafkaSource(kafka_config, topic_name).verify_identity(anchors_only) is None

    with TopicAdmin(kafka_config) as admin:
        admin.recreate_topic(topic_name, 2)
    replay_events(table, kafka_config, topic_name, progress=False)  # the very same events, written again
    assert "deleted and recreated" in KafkaSource(kafka_config, topic_name).verify_identity(identity)
    assert "is not the one the snapshot read" in KafkaSource(kafka_config, topic_name).verify_identity(anchors_only)

    with TopicAdmin(kafka_config) as admin:
        admin.recreate_topic(topic_name, 2)  # empty now: the anchored offsets are beyond its end
    assert "ends at offset 0" in KafkaSource(kafka_config, topic_name).verify_identity(anchors_only)
