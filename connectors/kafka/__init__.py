"""Kafka connectors: correct on Apache Kafka and on the embedded Tansu broker alike.

- `broker`: the embedded broker (zero-setup default), `ensure_broker`, reachability, client kwargs.
- `admin`: explicit topic creation/deletion, clients built from KafkaConfig, correct end offsets.
- `replay`: dataset table -> topic in event-time order, every acknowledgement counted.
- `source`: ordered, resumable micro-batches from a topic; `read_topic_table` for training.
- `dlq`: dead-letter sinks for poison messages.

Measured broker differences that shape this code: docs/kafka-broker-facts.md.
"""
