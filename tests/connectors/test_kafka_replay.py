"""Replay: everything produced is acknowledged, pacing works, failures say how to re-run safely."""

from __future__ import annotations

import tempfile
import threading
import time

import numpy as np
import pytest

from connectors.kafka.admin import TopicAdmin, end_offsets, new_consumer
from connectors.kafka.broker import EmbeddedBroker
from connectors.kafka.replay import _Acks, _pacer, read_replay_meta, replay_events, split_indices
from connectors.kafka.source import read_topic_table
from felrec_stream.config import KafkaConfig, replace
from felrec_stream.errors import ConfigError, DatasetError, KafkaError, ReplayError
from felrec_stream.stream.events import make_events
from tests.waiting import wait_for

pytestmark = pytest.mark.kafka


def random_events(n: int, seed: int = 0, users: int = 50, span: int = 10**6):
    rng = np.random.default_rng(seed)
    return make_events(rng.integers(0, users, n), rng.integers(0, 40, n), np.sort(rng.integers(0, span, n)))


def _topic(kafka_config, name, partitions=3):
    with TopicAdmin(kafka_config) as admin:
        admin.create_topic(name, partitions)
    return name


def test_replay_acknowledges_everything_and_round_trips(kafka_config, topic_name):
    table = random_events(3000)
    _topic(kafka_config, topic_name)
    result = replay_events(table, kafka_config, topic_name, progress=False)
    assert result.produced == result.acknowledged == len(table) == result.next_index
    assert sum(end_offsets(kafka_config, topic_name).values()) == len(table)
    assert read_topic_table(kafka_config, topic_name).equals(table)


def test_split_boundaries_are_published_on_the_meta_topic(kafka_config, topic_name):
    from kafka import TopicPartition

    table = random_events(1000, seed=1)
    _topic(kafka_config, topic_name, 2)
    splits = split_indices(len(table), 0.1, 0.1)
    replay_events(table, kafka_config, topic_name, progress=False, splits=splits, meta={"dataset": "random"})
    meta = read_replay_meta(kafka_config, topic_name)
    assert meta["dataset"] == "random" and meta["events"] == 1000 and meta["partitions"] == 2
    val = meta["splits"]["val"]
    assert val["index"] == splits["val"] == 800
    assert (val["timestamp"], val["event_id"]) == (table["timestamp"][800].as_py(), table["event_id"][800].as_py())
    # Reading each partition from the published offset yields exactly the validation+test events.
    consumer = new_consumer(kafka_config)
    tps = [TopicPartition(topic_name, p) for p in range(2)]
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, val["offsets"][str(tp.partition)])
    got = 0
    deadline = time.monotonic() + 10
    while got < 200 and time.monotonic() < deadline:
        got += sum(len(r) for r in consumer.poll(timeout_ms=100).values())
    consumer.close()
    assert got == 200


def test_no_meta_topic_without_splits(kafka_config, topic_name):
    _topic(kafka_config, topic_name, 1)
    replay_events(random_events(10), kafka_config, topic_name, progress=False)
    assert read_replay_meta(kafka_config, topic_name) is None


def _send_times_ms(kafka_config, topic: str, n: int) -> np.ndarray:
    """Record timestamps (the producer's send time, ms) of the first n messages of partition 0."""
    from kafka import TopicPartition

    consumer = new_consumer(kafka_config)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        times: list[int] = []

        def read_all() -> bool:
            times.extend(record.timestamp for record in consumer.poll(timeout_ms=100).get(tp, []))
            return len(times) >= n

        wait_for(read_all, 10, f"{n} messages were read back")
    finally:
        consumer.close()
    return np.asarray(times[:n])


def test_pacing_schedules_are_the_rate_or_the_event_time_over_the_speedup():
    table = make_events(["u"] * 4, ["i"] * 4, [0, 0, 3, 4])  # seconds
    assert [_pacer(table, 0, 1000, None, "s")(i) for i in range(4)] == pytest.approx([0, 0.001, 0.002, 0.003])
    assert [_pacer(table, 0, None, 10, "s")(i) for i in range(4)] == pytest.approx([0, 0, 0.3, 0.4])
    assert [_pacer(table, 0, None, 10, "ms")(i) for i in range(4)] == pytest.approx([0, 0, 0.0003, 0.0004])
    # resumed: the schedule starts at the first row sent
    assert [_pacer(table, 2, None, 10, "s")(i) for i in range(2, 4)] == pytest.approx([0, 0.1])
    assert _pacer(table, 0, None, None, "s") is None


# The schedule itself is checked exactly above. Here: the replay really waits for it. Event i is sent
# no earlier than schedule[i] after the replay's start, and the first send comes right after the
# start, so the sends span about the whole schedule; unpaced they would span a few ms. Half the
# schedule as the bound leaves room for a first send delayed by a loaded machine.


def test_rate_limit_paces_the_replay(kafka_config, topic_name):
    _topic(kafka_config, topic_name, 1)
    result = replay_events(random_events(300), kafka_config, topic_name, rate=500, progress=False)
    assert result.acknowledged == 300
    sent = _send_times_ms(kafka_config, topic_name, 300)
    assert sent[-1] - sent[0] >= 598 / 2  # scheduled 598 ms apart (unpaced: ~80 ms here)


def test_speedup_follows_event_time(kafka_config, topic_name):
    _topic(kafka_config, topic_name, 1)
    table = make_events(["u"] * 4, ["i"] * 4, [0, 0, 3, 4])  # 4 s of event time
    replay_events(table, kafka_config, topic_name, speedup=10, progress=False)
    sent = _send_times_ms(kafka_config, topic_name, 4)
    assert sent[-1] - sent[0] >= 400 / 2  # scheduled 400 ms apart


def test_start_from_resumes_without_gaps_or_repeats(kafka_config, topic_name):
    table = random_events(1000, seed=2)
    _topic(kafka_config, topic_name)
    replay_events(table.slice(0, 400), kafka_config, topic_name, progress=False)
    result = replay_events(table, kafka_config, topic_name, start_from=400, progress=False)
    assert result.produced == 600 and result.next_index == 1000
    assert read_topic_table(kafka_config, topic_name).equals(table)


def test_a_resume_from_before_what_already_landed_sends_those_rows_once(kafka_config, topic_name):
    """A run on a stalled broker saw 400 rows acknowledged but 430 landed: `--start-from 400`, as its
    error advises, must not write rows 400..429 a second time (consume would apply both)."""
    table = random_events(1000, seed=5)
    _topic(kafka_config, topic_name)
    replay_events(table.slice(0, 430), kafka_config, topic_name, progress=False)
    result = replay_events(table, kafka_config, topic_name, start_from=400, progress=False)
    assert sum(end_offsets(kafka_config, topic_name).values()) == 1000  # each row once
    assert (result.produced, result.already_there, result.next_index) == (570, 30, 1000)
    assert read_topic_table(kafka_config, topic_name).equals(table)


def test_unsorted_table_is_replayed_in_time_order(kafka_config, topic_name):
    table = random_events(200, seed=3)
    _topic(kafka_config, topic_name, 1)
    replay_events(table.take(np.random.default_rng(0).permutation(200)), kafka_config, topic_name, progress=False)
    assert read_topic_table(kafka_config, topic_name).equals(table)


def test_missing_topic_is_an_error_and_is_not_auto_created(kafka_config, topic_name):
    with pytest.raises(KafkaError, match="does not exist"):
        replay_events(random_events(5), kafka_config, topic_name, progress=False)
    with TopicAdmin(kafka_config) as admin:
        assert not admin.topic_exists(topic_name)


def test_options_and_timestamps_are_checked_before_sending(kafka_config, topic_name):
    table = random_events(10)
    with pytest.raises(ConfigError, match="not both"):
        replay_events(table, kafka_config, topic_name, rate=10, speedup=2)
    with pytest.raises(ConfigError, match="start_from"):
        replay_events(table, kafka_config, topic_name, start_from=11)
    ms = make_events(["u"], ["i"], [1_700_000_000_000])
    with pytest.raises(DatasetError, match="timestamp_unit"):
        replay_events(ms, kafka_config, topic_name)


@pytest.fixture
def own_broker(broker_binary):
    """A broker this test may kill (the session broker is shared)."""
    broker = EmbeddedBroker(data_dir=tempfile.mkdtemp(prefix="felrec-test-broker-"))
    broker.start()
    yield broker
    broker.stop(timeout_s=2)


@pytest.mark.timeout(60)
def test_broker_stopped_mid_replay_reports_acknowledged_and_rerun_is_safe(own_broker, monkeypatch):
    config = KafkaConfig(bootstrap_servers=own_broker.bootstrap_servers, request_timeout_ms=1500, connect_retries=2)
    table = random_events(6000, seed=4)
    _topic(config, "events", 2)
    some_acknowledged = threading.Event()
    on_ack = _Acks.on_ack

    def observed_on_ack(self: _Acks, index: int, metadata) -> None:
        on_ack(self, index, metadata)
        if self.count >= 500:
            some_acknowledged.set()

    monkeypatch.setattr(_Acks, "on_ack", observed_on_ack)

    def kill_once_some_are_acknowledged() -> None:
        # rate 4000/s: 500 acknowledged after ~0.13 s, 5500 events still to send when the broker dies
        if some_acknowledged.wait(timeout=30):
            own_broker.stop(timeout_s=0.1)  # Tansu drains open connections on SIGTERM: SIGKILL soon

    threading.Thread(target=kill_once_some_are_acknowledged, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(ReplayError) as caught:
        replay_events(table, config, "events", rate=4000, progress=False)
    assert time.monotonic() - started < 20
    error = caught.value
    assert 500 <= error.acknowledged < len(table)
    assert 0 < error.next_index <= error.acknowledged
    message = str(error)
    assert f"{error.acknowledged} of 6000 events acknowledged" in message
    assert "--recreate" in message and f"--start-from {error.next_index}" in message
    assert own_broker.bootstrap_servers in message

    # Re-run after restarting the (memory-only) broker and recreating the topic: complete and exact.
    restarted = EmbeddedBroker(port=own_broker.port, data_dir=own_broker.data_dir)
    restarted.start()
    try:
        _topic(config, "events", 2)
        result = replay_events(table, replace(config, request_timeout_ms=5000), "events", progress=False)
        assert result.produced == result.acknowledged == len(table)
        assert read_topic_table(config, "events").equals(table)
    finally:
        restarted.stop()
