"""Topic identity: recognise a topic that was deleted and recreated (or refilled) under the same name.

Offsets only mean something in the topic they were read from. After `replay --recreate`, or on a
broker that lost its data, the same name holds other records at the same offsets, and a snapshot
resumed there would mix two datasets. `KafkaSource.identity()` goes into every worker snapshot:

    {"topic_id": "<broker topic id>" | null,
     "anchors": {"<partition>": [offset, record timestamp (ms), digest of key and value]}}

- topic id: Apache Kafka (2.8+) and Tansu give a topic a new id whenever it is created; when
  both sides have one, it decides.
- anchors: the first record read from each partition. Its timestamp is the producer's write time,
  so even a re-replay of the same dataset differs. `check_identity` reads the record at that
  offset again and compares; a partition that now ends before the anchor differs too. When
  retention (or compaction) removed the anchored record it cannot be compared: the anchor is
  dropped with a warning and the next record read becomes the new one.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Mapping

from connectors.kafka.admin import end_offsets, kafka_errors, new_consumer
from felrec_stream.config import KafkaConfig
from felrec_stream.log import get_logger

log = get_logger(__name__)

Anchor = list  # [offset, record timestamp ms, digest]


def record_anchor(record: Any) -> Anchor:
    """The anchor of one consumed record (kafka-python ConsumerRecord)."""
    return [int(record.offset), int(record.timestamp), record_digest(record.key, record.value)]


def record_digest(key: bytes | None, value: bytes | None) -> str:
    """sha256 over key and value, with lengths, so (a, bc) and (ab, c) differ; None != b""."""
    sha = hashlib.sha256()
    for part in (key, value):
        sha.update(b"-" if part is None else b"+" + len(part).to_bytes(8, "big") + bytes(part))
    return sha.hexdigest()[:32]


def check_identity(kafka_config: KafkaConfig, topic: str, partitions: list[int], topic_id: str | None,
                   stored: Mapping[str, Any]) -> tuple[str | None, dict[int, Anchor]]:
    """(why `topic` is not the topic `stored` describes, or None; the stored anchors that matched)."""
    stored_id = stored.get("topic_id")
    if stored_id and topic_id and stored_id != topic_id:
        return (f"its topic id is {topic_id}, the snapshot's is {stored_id}: the topic was deleted and "
                "recreated", {})
    anchors = {int(p): list(a) for p, a in (stored.get("anchors") or {}).items()}
    gone = sorted(set(anchors) - set(partitions))
    if gone:
        return f"partition(s) {gone} no longer exist", {}
    if not anchors:
        return None, {}
    records, begins, ends = _records_at(kafka_config, topic, {p: a[0] for p, a in anchors.items()})
    kept = {}
    for p, (offset, timestamp, digest) in sorted(anchors.items()):
        if offset >= ends[p]:
            return f"partition {p} ends at offset {ends[p]}, but the snapshot read a record at offset {offset}", {}
        record = records.get(p)
        if offset < begins[p] or record is None or record.offset != offset:
            log.warning("topic_anchor_unverifiable", topic=topic, partition=p, offset=offset, earliest=begins[p],
                        reason="the record is no longer in the topic (retention or compaction)")
            continue
        if [int(record.timestamp), record_digest(record.key, record.value)] != [timestamp, digest]:
            return (f"the record at {topic}[{p}] offset {offset} is not the one the snapshot read (written at "
                    f"{record.timestamp} ms, the snapshot's at {timestamp} ms): the topic was recreated", {})
        kept[p] = anchors[p]
    return None, kept


def _records_at(kafka_config: KafkaConfig, topic: str,
                offsets: Mapping[int, int]) -> tuple[dict[int, Any], dict[int, int], dict[int, int]]:
    """(the record at each wanted offset where it exists, beginning offsets, end offsets) per partition.

    One consumer; the slower exact `end_offsets` only for partitions whose listed end does not
    already prove the record exists (Tansu lists too low an end, docs/kafka-broker-facts.md).
    """
    from kafka import TopicPartition

    tps = {p: TopicPartition(topic, p) for p in offsets}
    consumer = new_consumer(kafka_config, max_partition_fetch_bytes=65536)
    found: dict[int, Any] = {}
    try:
        with kafka_errors(f"reading anchor records of {topic!r}", kafka_config.bootstrap_servers):
            consumer.assign(list(tps.values()))
            begins = {tp.partition: int(o) for tp, o in consumer.beginning_offsets(list(tps.values())).items()}
            ends = {tp.partition: int(o) for tp, o in consumer.end_offsets(list(tps.values())).items()}
            unsure = [p for p, o in offsets.items() if ends[p] <= o]
            if unsure:
                ends.update(end_offsets(kafka_config, topic, unsure))
            wanted = {p for p, o in offsets.items() if begins[p] <= o < ends[p]}
            consumer.pause(*[tps[p] for p in set(tps) - wanted])
            for p in wanted:
                consumer.seek(tps[p], offsets[p])
            deadline = time.monotonic() + kafka_config.request_timeout_ms / 1000
            while set(found) != wanted and time.monotonic() < deadline:
                for tp, records in consumer.poll(timeout_ms=100).items():
                    if records and tp.partition not in found:
                        found[tp.partition] = records[0]
                        consumer.pause(tp)
    finally:
        consumer.close(autocommit=False)
    return found, begins, ends
