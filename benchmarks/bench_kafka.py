"""Kafka path throughput next to bare file reading of the same events, measured in one run.

Run: python benchmarks/bench_kafka.py [--events 100000] [--partitions 4] [--batch-size 1024]
     [--bootstrap-servers HOST:PORT]   (default: a private embedded Tansu broker)

Figures (events/s, one line each, then one JSON line):
- file_parquet_batches: read a Parquet file of the events and cut EventBatch micro-batches
- file_jsonl_decode:    read the encoded messages from a file and decode/validate each one
                        (the per-message cost the Kafka source pays before any Kafka work)
- kafka_replay_produce: replay_events (encode, idempotent acks=all produce, every ack counted)
- kafka_ordered_batches: KafkaSource until_end (fetch, decode, k-way merge, micro-batches)
- kafka_read_topic_table: read_topic_table (the same, collected into a canonical table)
Why side by side: the gap between file and Kafka rows is the price of the broker round trip and
of kafka-python, which is the bottleneck (the notes measured ~80-95k produce / ~180k consume msg/s
for bare 100-byte records on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from connectors.kafka.admin import TopicAdmin  # noqa: E402
from connectors.kafka.broker import ensure_broker  # noqa: E402
from connectors.kafka.replay import replay_events  # noqa: E402
from connectors.kafka.source import KafkaSource, read_topic_table  # noqa: E402
from felrec_stream.config import KafkaConfig, replace  # noqa: E402
from felrec_stream.log import configure_logging  # noqa: E402
from felrec_stream.stream.events import iter_batches, make_events  # noqa: E402
from felrec_stream.stream.messages import Event, decode_event, encode_event  # noqa: E402


def make_table(n: int) -> pa.Table:
    """Synthetic events (felrec_stream.data.synthetic when present, else random ids and times)."""
    try:
        from felrec_stream.data.synthetic import config_from_options, generate

        return generate(config_from_options("small", n_events=n, n_users=max(300, n // 50),
                                            n_items=max(200, n // 100))).events
    except ImportError:
        rng = np.random.default_rng(0)
        return make_events(rng.integers(0, max(1, n // 50), n), rng.integers(0, max(1, n // 100), n),
                           np.sort(rng.integers(0, 10**9, n)))


def timed(label: str, n: int, fn) -> dict:
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    row = {"figure": label, "events": n, "seconds": round(seconds, 3), "events_per_s": round(n / seconds)}
    print(f"{label:<24} {row['events_per_s']:>10,} events/s  ({n:,} events in {seconds:.2f} s)", flush=True)
    return {**row, "result": result}


def file_figures(table: pa.Table, workdir: Path, batch_size: int) -> list[dict]:
    parquet = workdir / "events.parquet"
    pq.write_table(table, parquet)
    jsonl = workdir / "events.jsonl"
    with open(jsonl, "wb") as out:
        cols = [table.column(c).to_pylist() for c in ("user", "item", "timestamp", "event_id")]
        for user, item, ts, event_id in zip(*cols):
            out.write(encode_event(user, item, ts, event_id)[1] + b"\n")

    def parquet_batches() -> int:
        return sum(len(b) for b in iter_batches(pq.read_table(parquet), batch_size))

    def jsonl_decode() -> int:
        with open(jsonl, "rb") as lines:
            return sum(isinstance(decode_event(line.rstrip(b"\n")), Event) for line in lines)

    return [timed("file_parquet_batches", len(table), parquet_batches),
            timed("file_jsonl_decode", len(table), jsonl_decode)]


def kafka_figures(table: pa.Table, kafka: KafkaConfig, partitions: int, batch_size: int) -> list[dict]:
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    with TopicAdmin(kafka) as admin:
        admin.create_topic(topic, partitions)
    try:
        rows = [timed("kafka_replay_produce", len(table),
                      lambda: replay_events(table, kafka, topic, progress=False).acknowledged)]

        def ordered() -> int:
            with KafkaSource(kafka, topic, batch_size=batch_size, max_wait_s=3600) as source:
                return sum(len(b) for b in source.batches())

        rows.append(timed("kafka_ordered_batches", len(table), ordered))
        rows.append(timed("kafka_read_topic_table", len(table), lambda: len(read_topic_table(kafka, topic))))
        return rows
    finally:
        with TopicAdmin(kafka) as admin:
            admin.delete_topic(topic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--bootstrap-servers", default=os.environ.get("FELREC_BOOTSTRAP_SERVERS", ""))
    args = parser.parse_args()
    configure_logging(level=os.environ.get("FELREC_LOG_LEVEL", "WARNING"))
    table = make_table(args.events)
    kafka = KafkaConfig(bootstrap_servers=args.bootstrap_servers, request_timeout_ms=30000)
    with tempfile.TemporaryDirectory() as tmp, ensure_broker(kafka) as servers:
        print(f"{len(table):,} events, {args.partitions} partitions, batch {args.batch_size}, broker {servers}")
        rows = file_figures(table, Path(tmp), args.batch_size)
        rows += kafka_figures(table, replace(kafka, bootstrap_servers=servers), args.partitions, args.batch_size)
    assert all(r["result"] == len(table) for r in rows), "a path lost or duplicated events"
    print(json.dumps({"bench": "kafka", "rows": [{k: v for k, v in r.items() if k != "result"} for r in rows]}))


if __name__ == "__main__":
    main()
