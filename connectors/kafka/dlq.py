"""Dead-letter sinks (`felrec_stream.stream.source.DeadLetterSink`): where poison messages go so
that nothing is dropped silently.

Each `PoisonMessage` is written to the dead-letter topic (`KafkaConfig.dead_letter_topic`) with
its raw bytes as the value (None for a tombstone), the original key, and headers that say why and
where it came from:

    felrec.kind, felrec.field, felrec.reason, felrec.source.topic, felrec.source.partition,
    felrec.source.offset, felrec.original.size (value bytes), felrec.original.key_size,
    felrec.truncated ("true"/"false")   (UTF-8 strings; absent values are empty strings)

Values above `MAX_VALUE_BYTES` (and keys above `MAX_KEY_BYTES`) are truncated: a poison message
can be as large as the broker allows (several MB), a dead letter must fit the producer's and the
dead-letter topic's 1 MB default limits, or the worker could never pass that message.

Lifecycle: `send()` per poison message (asynchronous), `flush()` before the caller commits
offsets or persists positions past those messages (raises KafkaError when any dead letter
could not be written), `close()`. Delivery is at-least-once: a consumer that restarts from a
position before a poison message writes it again.
"""

from __future__ import annotations

from typing import Any

from connectors.kafka.admin import TopicAdmin, close_producer, kafka_errors, new_producer
from felrec_stream.config import KafkaConfig
from felrec_stream.errors import KafkaError
from felrec_stream.log import get_logger
from felrec_stream.stream.messages import PoisonMessage

log = get_logger(__name__)

MAX_VALUE_BYTES = 256 * 1024
MAX_KEY_BYTES = 4096


def dead_letter_headers(poison: PoisonMessage) -> list[tuple[str, bytes]]:
    """Kafka headers describing a poison message (reason, source position, original sizes)."""
    value_size = None if poison.raw is None else len(poison.raw)
    key_size = None if poison.key is None else len(poison.key)
    values = {
        "felrec.kind": poison.kind,
        "felrec.field": poison.field,
        "felrec.reason": poison.reason,
        "felrec.source.topic": poison.topic,
        "felrec.source.partition": poison.partition,
        "felrec.source.offset": poison.offset,
        "felrec.original.size": value_size,
        "felrec.original.key_size": key_size,
        "felrec.truncated": str((value_size or 0) > MAX_VALUE_BYTES or (key_size or 0) > MAX_KEY_BYTES).lower(),
    }
    return [(name, b"" if value is None else str(value).encode("utf-8")) for name, value in values.items()]


def _head(data: bytes | None, limit: int) -> bytes | None:
    return data if data is None or len(data) <= limit else bytes(data[:limit])


class MemoryDeadLetters:
    """In-memory sink for tests and offline tools: keeps every poison message in `messages`."""

    def __init__(self) -> None:
        self.messages: list[PoisonMessage] = []

    def send(self, poison: PoisonMessage) -> None:
        self.messages.append(poison)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class KafkaDeadLetters:
    """Writes poison messages to the dead-letter topic (created explicitly with one partition)."""

    def __init__(self, kafka_config: KafkaConfig, topic: str | None = None) -> None:
        self.topic = topic or kafka_config.dead_letter_topic
        self._servers = kafka_config.bootstrap_servers
        with TopicAdmin(kafka_config) as admin:
            admin.ensure_topic(self.topic, 1)
        self._producer = new_producer(kafka_config, linger_ms=20)
        self.sent = 0
        self.acknowledged = 0
        self.failed: list[str] = []

    def send(self, poison: PoisonMessage) -> None:
        """Queue one dead letter; failures surface in flush(), never vanish."""
        with kafka_errors(f"writing to dead-letter topic {self.topic!r}", self._servers):
            future = self._producer.send(self.topic, key=_head(poison.key, MAX_KEY_BYTES),
                                         value=_head(poison.raw, MAX_VALUE_BYTES), headers=dead_letter_headers(poison))
        self.sent += 1
        future.add_callback(self._on_ack)
        future.add_errback(self._on_error, poison)

    def _on_ack(self, _metadata: Any) -> None:
        self.acknowledged += 1

    def _on_error(self, poison: PoisonMessage, exc: BaseException) -> None:  # partial(f, poison)(exc)
        self.failed.append(f"{poison.topic}/{poison.partition}@{poison.offset}: {exc}")

    def flush(self, timeout_s: float | None = 30.0) -> None:
        """Block until every dead letter is acknowledged; KafkaError when any was not."""
        with kafka_errors(f"flushing dead-letter topic {self.topic!r}", self._servers):
            self._producer.flush(timeout=timeout_s)
        missing = self.sent - self.acknowledged
        if self.failed or missing:
            raise KafkaError(f"{len(self.failed) or missing} of {self.sent} dead letter(s) could not be written "
                             f"to {self.topic!r}: {'; '.join(self.failed[:3])}")

    def close(self) -> None:
        close_producer(self._producer)
