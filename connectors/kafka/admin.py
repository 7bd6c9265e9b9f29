"""Kafka clients built from KafkaConfig, topic administration, and end offsets that are right on Tansu too.

Rules that keep us correct on both Apache Kafka and Tansu (docs/kafka-broker-facts.md):
- Topics are created explicitly with their partition count. Clients get
  `allow_auto_create_topics=False`, but Tansu still auto-creates a topic (with a default partition
  count) when a *producer* asks for its metadata, so producers check that the topic exists first.
- End offsets are max(ListOffsets "latest", fetch high watermark): Tansu's ListOffsets latest is
  the base offset of the last batch + 1, its fetch high watermark is right; on Apache Kafka both
  agree.
- Every client construction first checks the broker with bounded TCP retries and maps
  kafka-python's exceptions to `felrec_stream.errors.KafkaError` naming the address.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterable, Iterator

from connectors.kafka.broker import check_reachable, client_kwargs
from felrec_stream.config import KafkaConfig, topic_name_problem
from felrec_stream.errors import KafkaError
from felrec_stream.log import get_logger

log = get_logger(__name__)

# Consumer settings measured to keep group joins/rebalances at seconds on both brokers; fetch
# waits must be >= 1 ms (Tansu never answers fetch_max_wait_ms=0 with data).
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable_auto_commit": False,
    "allow_auto_create_topics": False,
    "auto_offset_reset": "earliest",
    "fetch_max_wait_ms": 100,
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "max_poll_records": 2000,
}
_ZERO_UUID_BASE64 = "AAAAAAAAAAAAAAAAAAAAAA"  # how some clients render a broker's "no topic id"


@contextlib.contextmanager
def kafka_errors(action: str, bootstrap_servers: str) -> Iterator[None]:
    """Turn kafka-python and socket errors into one KafkaError that says what failed and where."""
    from kafka.errors import KafkaError as ClientError

    try:
        yield
    except (ClientError, OSError, AssertionError) as exc:
        raise KafkaError(f"{action} failed on {bootstrap_servers}: {type(exc).__name__}: {exc}") from exc


def _servers(kafka_config: KafkaConfig) -> str:
    return kafka_config.bootstrap_servers or "(no bootstrap servers)"


def new_admin(kafka_config: KafkaConfig) -> Any:
    """A connected KafkaAdminClient (close it, or use TopicAdmin which does)."""
    from kafka import KafkaAdminClient

    check_reachable(kafka_config.bootstrap_servers, kafka_config.connect_retries)
    with kafka_errors("connecting an admin client", _servers(kafka_config)):
        return KafkaAdminClient(**client_kwargs(kafka_config))


def new_producer(kafka_config: KafkaConfig, **overrides: Any) -> Any:
    """A connected KafkaProducer with acks='all'; never acks=0 (Tansu lost records with it)."""
    from kafka import KafkaProducer

    settings: dict[str, Any] = {"acks": "all", "allow_auto_create_topics": False, **overrides}
    check_reachable(kafka_config.bootstrap_servers, kafka_config.connect_retries)
    with kafka_errors("connecting a producer", _servers(kafka_config)):
        return KafkaProducer(**client_kwargs(kafka_config), **settings)


def new_consumer(kafka_config: KafkaConfig, **overrides: Any) -> Any:
    """A connected KafkaConsumer without subscriptions (callers `assign` partitions explicitly)."""
    from kafka import KafkaConsumer

    settings = {**CONSUMER_DEFAULTS, **overrides}
    check_reachable(kafka_config.bootstrap_servers, kafka_config.connect_retries)
    with kafka_errors("connecting a consumer", _servers(kafka_config)):
        return KafkaConsumer(**client_kwargs(kafka_config), **settings)


def close_producer(producer: Any, timeout_s: float = 5.0) -> None:
    """Close a producer without hanging or leaking its IO thread when records are still pending.

    kafka-python's close() flushes first and raises KafkaTimeoutError when records are pending,
    even with timeout 0, leaving its sender thread alive; an idempotent producer whose broker died
    keeps such records forever (it waits for a new producer id before expiring them). Then the
    sender is force-closed through kafka-python's own (private) hook, best effort.
    """
    try:
        producer.close(timeout=timeout_s)
    except Exception as exc:  # KafkaTimeoutError from the flush inside close()
        sender = getattr(producer, "_sender", None)
        if sender is not None and hasattr(sender, "force_close"):
            sender.force_close()
        with contextlib.suppress(Exception):
            producer._closed = True  # its __del__ would otherwise retry (and fail) the flush
        log.warning("producer_force_closed", reason=f"{type(exc).__name__}: {exc}")


class TopicAdmin:
    """Topic operations on one connection. Use as a context manager (closes the admin client)."""

    def __init__(self, kafka_config: KafkaConfig) -> None:
        self.kafka_config = kafka_config
        self._servers = _servers(kafka_config)
        self._admin = new_admin(kafka_config)

    def __enter__(self) -> "TopicAdmin":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._admin.close()

    def list_topics(self) -> list[str]:
        with kafka_errors("listing topics", self._servers):
            return sorted(self._admin.list_topics())

    def topic_exists(self, topic: str) -> bool:
        return topic in self.list_topics()

    def partitions(self, topic: str) -> list[int]:
        """Partition ids of an existing topic (KafkaError when it does not exist)."""
        return self.describe(topic)[0]

    def describe(self, topic: str) -> tuple[list[int], str | None]:
        """(partition ids, topic id) of an existing topic; the id is None where the broker has none
        (Apache Kafka before 2.8 answers the all-zero id). A deleted and recreated topic gets a new id."""
        with kafka_errors(f"describing topic {topic!r}", self._servers):
            described = self._admin.describe_topics([topic])
        found = [t for t in described if t.get("name") == topic and t.get("error_code", 0) == 0]
        if not found or not found[0].get("partitions"):
            raise KafkaError(f"topic {topic!r} does not exist on {self._servers}; create it first "
                             f"(e.g. `felrec-stream replay ... --topic {topic}`)")
        topic_id = str(found[0].get("topic_id") or "")
        known = topic_id.strip("0-") and topic_id != _ZERO_UUID_BASE64
        return sorted(p["partition_index"] for p in found[0]["partitions"]), topic_id if known else None

    def create_topic(self, topic: str, partitions: int, exists_ok: bool = False,
                     replication_factor: int = -1, just_deleted: bool = False) -> bool:
        """Create `topic` with exactly `partitions`; returns False when it existed (and exists_ok).

        replication_factor=-1 asks for the broker's default (KIP-464), right for a real cluster.
        `just_deleted` retries "already exists" for a while: Apache Kafka deletes asynchronously.
        """
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        problem = topic_name_problem(topic)  # Tansu would create an illegal name
        if problem is not None:
            raise KafkaError(f"cannot create topic: {problem}")
        deadline = time.monotonic() + self.kafka_config.request_timeout_ms / 1000
        while True:
            with kafka_errors(f"creating topic {topic!r}", self._servers):
                try:
                    self._admin.create_topics([NewTopic(topic, partitions, replication_factor)])
                    break
                except TopicAlreadyExistsError:
                    if exists_ok:
                        return False
                    if not just_deleted or time.monotonic() > deadline:
                        raise KafkaError(f"topic {topic!r} already exists on {self._servers}; "
                                         "recreate it (replay --recreate) to start empty") from None
            time.sleep(0.2)
        with kafka_errors(f"waiting for topic {topic!r}", self._servers):
            self._admin.wait_for_topics([topic], timeout_ms=self.kafka_config.request_timeout_ms)
        log.info("topic_created", topic=topic, partitions=partitions)
        return True

    def delete_topic(self, topic: str, missing_ok: bool = True) -> bool:
        """Delete `topic`; returns False when it did not exist (and missing_ok)."""
        if not self.topic_exists(topic):
            if missing_ok:
                return False
            raise KafkaError(f"cannot delete topic {topic!r}: it does not exist on {self._servers}")
        with kafka_errors(f"deleting topic {topic!r}", self._servers):
            self._admin.delete_topics([topic])
        self._wait_gone(topic)
        log.info("topic_deleted", topic=topic)
        return True

    def _wait_gone(self, topic: str) -> None:
        deadline = time.monotonic() + self.kafka_config.request_timeout_ms / 1000
        while self.topic_exists(topic):
            if time.monotonic() > deadline:
                raise KafkaError(f"topic {topic!r} still listed {self.kafka_config.request_timeout_ms} ms "
                                 "after deletion")
            time.sleep(0.1)

    def recreate_topic(self, topic: str, partitions: int) -> None:
        """Delete (when present) and create empty: the safe way to re-run a replay."""
        deleted = self.delete_topic(topic, missing_ok=True)
        self.create_topic(topic, partitions, just_deleted=deleted)

    def ensure_topic(self, topic: str, partitions: int) -> list[int]:
        """Create `topic` when missing; an existing topic keeps its partitions (a warning if they differ)."""
        if not self.topic_exists(topic):
            self.create_topic(topic, partitions, exists_ok=True)
        found = self.partitions(topic)
        if len(found) != partitions:
            log.warning("topic_partitions_differ", topic=topic, existing=len(found), requested=partitions)
        return found


def end_offsets(kafka_config: KafkaConfig, topic: str, partitions: Iterable[int] | None = None,
                timeout_s: float | None = None, isolation_level: str = "read_committed") -> dict[int, int]:
    """Per-partition end offsets (offset of the next record) = max(ListOffsets latest, high watermark).

    The high watermark comes from a fetch: seek one record before the listed end (never beyond
    it: Tansu stalls on fetches past the high watermark) and poll until every partition has
    reported one.
    """
    from kafka import TopicPartition

    if partitions is None:
        with TopicAdmin(kafka_config) as admin:
            partitions = admin.partitions(topic)
    tps = [TopicPartition(topic, p) for p in partitions]
    consumer = new_consumer(kafka_config, fetch_max_wait_ms=10, max_partition_fetch_bytes=65536,
                            isolation_level=isolation_level)
    try:
        with kafka_errors(f"reading end offsets of {topic!r}", _servers(kafka_config)):
            consumer.assign(tps)
            listed = consumer.end_offsets(tps)
            begins = consumer.beginning_offsets(tps)
            for tp in tps:
                consumer.seek(tp, max(begins[tp], listed[tp] - 1))
            return _highwater_max(consumer, tps, listed, timeout_s or kafka_config.request_timeout_ms / 1000)
    finally:
        consumer.close(autocommit=False)


def beginning_offsets(kafka_config: KafkaConfig, topic: str) -> dict[int, int]:
    """Per-partition earliest available offsets (above 0 once retention deleted records)."""
    from kafka import TopicPartition

    with TopicAdmin(kafka_config) as admin:
        tps = [TopicPartition(topic, p) for p in admin.partitions(topic)]
    consumer = new_consumer(kafka_config)
    try:
        with kafka_errors(f"reading beginning offsets of {topic!r}", _servers(kafka_config)):
            return {tp.partition: int(o) for tp, o in consumer.beginning_offsets(tps).items()}
    finally:
        consumer.close(autocommit=False)


def _highwater_max(consumer: Any, tps: list[Any], listed: dict[Any, int], timeout_s: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    while any(consumer.highwater(tp) is None for tp in tps):
        if time.monotonic() > deadline:
            missing = [tp.partition for tp in tps if consumer.highwater(tp) is None]
            raise KafkaError(f"no fetch response for partitions {missing} within {timeout_s:.1f} s")
        consumer.poll(timeout_ms=50)
    return {tp.partition: max(int(listed[tp]), int(consumer.highwater(tp))) for tp in tps}
