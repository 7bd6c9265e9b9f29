"""Topic administration and end offsets that are right on Tansu and Apache Kafka alike."""

from __future__ import annotations

from collections import Counter

import pytest

from connectors.kafka.admin import TopicAdmin, end_offsets, new_consumer, new_producer
from felrec_stream.errors import KafkaError

pytestmark = pytest.mark.kafka


def test_create_describe_list_delete(kafka_config, topic_name):
    with TopicAdmin(kafka_config) as admin:
        assert admin.create_topic(topic_name, 3)
        assert admin.partitions(topic_name) == [0, 1, 2]
        assert topic_name in admin.list_topics()
        assert not admin.create_topic(topic_name, 3, exists_ok=True)
        with pytest.raises(KafkaError, match="already exists"):
            admin.create_topic(topic_name, 3)
        admin.recreate_topic(topic_name, 2)
        assert admin.partitions(topic_name) == [0, 1]
        assert admin.delete_topic(topic_name)
        assert not admin.topic_exists(topic_name)
        assert not admin.delete_topic(topic_name)  # missing_ok
        with pytest.raises(KafkaError, match="does not exist"):
            admin.partitions(topic_name)


def test_end_offsets_count_every_record(kafka_config, topic_name):
    with TopicAdmin(kafka_config) as admin:
        admin.create_topic(topic_name, 3)
    producer = new_producer(kafka_config, linger_ms=5)
    futures = [producer.send(topic_name, key=f"user-{i % 17}".encode(), value=b"x") for i in range(2000)]
    producer.flush()
    producer.close()
    counts = Counter(f.get().partition for f in futures)
    assert end_offsets(kafka_config, topic_name) == {p: counts.get(p, 0) for p in range(3)}


def test_end_offsets_of_an_empty_topic(kafka_config, topic_name):
    with TopicAdmin(kafka_config) as admin:
        admin.create_topic(topic_name, 2)
    assert end_offsets(kafka_config, topic_name) == {0: 0, 1: 0}


def test_ensure_topic_keeps_an_existing_topic(kafka_config, topic_name):
    with TopicAdmin(kafka_config) as admin:
        assert admin.ensure_topic(topic_name, 2) == [0, 1]
        assert admin.ensure_topic(topic_name, 5) == [0, 1]  # warns, never changes partitions


@pytest.mark.embedded_unsupported
def test_list_offsets_latest_equals_high_watermark_on_apache_kafka(kafka_config, topic_name):
    """On Tansu ListOffsets latest is the last batch's base offset + 1; Apache Kafka is exact."""
    from kafka import TopicPartition

    with TopicAdmin(kafka_config) as admin:
        admin.create_topic(topic_name, 1)
    producer = new_producer(kafka_config, linger_ms=5)
    for i in range(500):
        producer.send(topic_name, key=b"k", value=b"%d" % i)
    producer.flush()
    producer.close()
    consumer = new_consumer(kafka_config)
    try:
        tp = TopicPartition(topic_name, 0)
        assert consumer.end_offsets([tp])[tp] == 500
    finally:
        consumer.close()


@pytest.mark.embedded_unsupported
def test_producer_does_not_auto_create_topics_on_apache_kafka(kafka_config, topic_name):
    """Tansu auto-creates a topic on a producer's metadata request despite allow_auto_create_topics=False."""
    from kafka.errors import KafkaError as ClientError

    producer = new_producer(kafka_config, max_block_ms=2000)
    try:
        with pytest.raises(ClientError):  # metadata timeout: the topic never appears
            producer.send(topic_name, b"x").get(timeout=5)
    finally:
        producer.close(timeout=0)
    with TopicAdmin(kafka_config) as admin:
        assert not admin.topic_exists(topic_name)
