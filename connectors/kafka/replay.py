"""Replay a canonical event table into a Kafka topic, in event-time order, and prove it arrived.

Why this shape:
- Events are produced in (timestamp, event_id) order, keyed by user (murmur2 partitioning keeps
  each user's events in one partition, in order), with their `event_id` in the message so that
  every consumer sees the same ids and the same total order, replay after replay.
- Idempotent producer, acks='all': no duplicates from producer retries, nothing acknowledged
  that a broker could lose. Every send has a callback; the replay succeeds only when produced ==
  acknowledged, and otherwise raises `ReplayError` with the counts and how to re-run safely.
- Kafka record timestamps are left to the broker (write time). Event time lives in the message
  body: historical times (MovieLens is from 1998) as record timestamps would make time-based
  retention delete the replayed data at once.
- Split boundaries (where validation and test begin) are written after a successful replay as
  one JSON control message on `<topic>.meta` (key `splits`), so that training or evaluation from
  the topic on another machine needs no shared file: see `read_replay_meta`. The boundary is the
  (timestamp, event_id) of the first event of the part (an event belongs to it when its
  (timestamp, event_id) is >= that), plus, per partition, the offset of that part's first event.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa

from connectors.kafka.admin import (TopicAdmin, close_producer, end_offsets, kafka_errors, new_consumer,
                                   new_producer)
from felrec_stream.config import KafkaConfig
from felrec_stream.data.split import split_sizes
from felrec_stream.errors import ConfigError, DatasetError, KafkaError, ReplayError
from felrec_stream.log import get_logger
from felrec_stream.stream.events import is_time_ordered, sort_events, validate_events
from felrec_stream.stream.messages import (TS_UNITS, PoisonMessage, decode_event, encode_event, invalid_events,
                                           latest_timestamp)

log = get_logger(__name__)

META_SUFFIX = ".meta"
META_KEY = b"splits"
_CHUNK = 65536  # rows converted to Python objects at a time (bounded memory for big tables)
_CHECK_EVERY = 1024  # sends between progress/pacing/error checks


@dataclass(frozen=True)
class ReplayResult:
    """What a replay did; `next_index` is where a later `start_from` would continue."""

    topic: str
    total: int
    start_from: int
    produced: int
    acknowledged: int
    seconds: float
    events_per_s: float
    partitions: int
    meta: Mapping[str, Any] | None = None
    already_there: int = 0  # rows from start_from on that an interrupted run had written: not sent again

    @property
    def next_index(self) -> int:
        return self.start_from + self.acknowledged


def meta_topic(topic: str) -> str:
    return topic + META_SUFFIX


def split_indices(n_events: int, val_fraction: float = 0.1, test_fraction: float = 0.1) -> dict[str, int]:
    """Rows where validation and test begin, by the same rule as `felrec_stream.data.split.chronological_split`."""
    n_train, n_val, _ = split_sizes(n_events, val_fraction, test_fraction)
    return {"val": n_train, "test": n_train + n_val}


@dataclass
class _Acks:
    """Delivery accounting, updated from the producer's IO thread via future callbacks."""

    n: int
    boundaries: Mapping[str, int]
    acked: np.ndarray = field(init=False)
    count: int = 0
    errors: list[str] = field(default_factory=list)
    first_offsets: dict[str, dict[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.acked = np.zeros(self.n, dtype=bool)
        self.first_offsets = {name: {} for name in self.boundaries}

    def on_ack(self, index: int, metadata: Any) -> None:
        self.acked[index] = True
        self.count += 1
        for name, start in self.boundaries.items():
            if index >= start:
                seen = self.first_offsets[name]
                if metadata.offset < seen.get(metadata.partition, 1 << 62):
                    seen[metadata.partition] = metadata.offset

    def on_error(self, index: int, exc: BaseException) -> None:
        if len(self.errors) < 5:
            self.errors.append(f"event {index}: {type(exc).__name__}: {exc}")

    def contiguous(self) -> int:
        """Number of leading events that are all acknowledged."""
        missing = np.flatnonzero(~self.acked)
        return int(missing[0]) if len(missing) else self.n


def replay_events(table: pa.Table, kafka_config: KafkaConfig, topic: str | None = None,
                  rate: float | None = None, speedup: float | None = None, progress: bool = True,
                  start_from: int = 0, splits: Mapping[str, int] | None = None,
                  meta: Mapping[str, Any] | None = None) -> ReplayResult:
    """Produce the events of `table` (from row `start_from` on) to `topic`; the topic must exist.

    rate: at most this many events/s; speedup: event time runs this many times faster than wall
    time (unit from `kafka_config.timestamp_unit`); neither: as fast as the broker acknowledges.
    splits: {"val": row, "test": row} boundaries (row indices of the time-ordered table) to
    publish on `<topic>.meta`; `meta` adds free-form fields (e.g. the dataset name) to it.
    """
    topic = topic or kafka_config.topic
    table = prepare_events(table, kafka_config)
    _check_options(len(table), rate, speedup, start_from, splits)
    with TopicAdmin(kafka_config) as admin:
        partitions = len(admin.partitions(topic))  # never let the producer auto-create it
    boundaries = {name: int(row) - start_from for name, row in (splits or {}).items()}
    acks = _Acks(len(table) - start_from, boundaries)
    there = _already_there(kafka_config, topic, table, start_from)
    for rel in np.flatnonzero(there):
        acks.acked[rel] = True
        acks.count += 1
    producer = new_producer(kafka_config, enable_idempotence=True, acks="all", linger_ms=10,
                            batch_size=256 * 1024, max_block_ms=kafka_config.request_timeout_ms,
                            delivery_timeout_ms=2 * kafka_config.request_timeout_ms + 10)
    started = time.perf_counter()
    try:
        produced = _send_all(producer, table, topic, kafka_config, acks, start_from,
                             _pacer(table, start_from, rate, speedup, kafka_config.timestamp_unit), progress, there)
        _await_acks(producer, acks, kafka_config)
    except KeyboardInterrupt:
        close_producer(producer, 0)
        log.warning("replay_interrupted", topic=topic, acknowledged=acks.count,
                    next_index=start_from + acks.contiguous())
        raise
    except Exception as exc:
        close_producer(producer, 0)
        raise _replay_error(topic, kafka_config, acks, start_from, len(table), f"{type(exc).__name__}: {exc}") from exc
    if acks.errors or acks.count != produced + int(there.sum()):
        close_producer(producer, 0)
        raise _replay_error(topic, kafka_config, acks, start_from, len(table), "; ".join(acks.errors[:2]))
    seconds = time.perf_counter() - started
    close_producer(producer)
    written = _write_meta(kafka_config, topic, table, splits, acks, start_from, partitions, meta)
    result = ReplayResult(topic, len(table), start_from, produced, acks.count, seconds,
                          produced / seconds if seconds > 0 else float("inf"), partitions, written,
                          int(there.sum()))
    log.info("replay_done", topic=topic, produced=produced, acknowledged=acks.count, start_from=start_from,
             seconds=round(seconds, 3), events_per_s=round(result.events_per_s))
    return result


def prepare_events(table: pa.Table, kafka_config: KafkaConfig) -> pa.Table:
    """Canonical and time-ordered, every event one a consumer accepts (`invalid_events` with the
    topic's timestamp unit); checked before anything is sent or a topic is created."""
    validate_events(table)
    if not is_time_ordered(table):
        table = sort_events(table)
    problems = invalid_events(table, kafka_config.timestamp_unit,
                              not_after=latest_timestamp(kafka_config.timestamp_unit, kafka_config.future_skew_s))
    if problems:
        ids = table.column("event_id")
        details = "; ".join(f"event_id {ids[row].as_py()}: {why}" for row, why in problems)
        raise DatasetError(f"events a consumer would reject (kafka.timestamp_unit={kafka_config.timestamp_unit!r}): "
                           f"{details}")
    return table


def _check_options(n: int, rate: float | None, speedup: float | None, start_from: int,
                   splits: Mapping[str, int] | None) -> None:
    if rate is not None and speedup is not None:
        raise ConfigError("give either a rate (events/s) or a speed-up over event time, not both")
    if (rate is not None and rate <= 0) or (speedup is not None and speedup <= 0):
        raise ConfigError("rate and speedup must be > 0")
    if not 0 <= start_from <= n:
        raise ConfigError(f"start_from must be in [0, {n}], got {start_from}")
    for name, row in (splits or {}).items():
        if not 0 <= row <= n:
            raise ConfigError(f"split boundary {name}={row} outside [0, {n}]")


def _pacer(table: pa.Table, start_from: int, rate: float | None, speedup: float | None,
           unit: str) -> Callable[[int], float] | None:
    """Seconds after the start at which row `i` may be sent (None: no pacing)."""
    if rate is not None:
        return lambda i: (i - start_from) / rate
    if speedup is not None and start_from < len(table):
        ts = table.column("timestamp").to_numpy()
        scale = 1.0 / (TS_UNITS[unit] * speedup)
        t0 = int(ts[start_from])
        return lambda i: (int(ts[i]) - t0) * scale
    return None


def _send_all(producer: Any, table: pa.Table, topic: str, kafka_config: KafkaConfig, acks: _Acks,
              start_from: int, pacer: Callable[[int], float] | None, progress: bool,
              skip: np.ndarray | None = None) -> int:
    """Send rows start_from.. in order, but those `skip` marks (indexed from start_from); stops early
    at the first delivery error. Returns #sent."""
    from tqdm import tqdm

    sent = 0
    started = time.monotonic()
    with tqdm(total=len(table) - start_from, disable=not progress, unit="ev", desc=f"replay {topic}",
              mininterval=0.5, smoothing=0.1) as bar:
        for chunk_start in range(start_from, len(table), _CHUNK):
            chunk = table.slice(chunk_start, _CHUNK)
            rows = zip(chunk.column("user").to_pylist(), chunk.column("item").to_pylist(),
                       chunk.column("timestamp").to_pylist(), chunk.column("event_id").to_pylist())
            for offset_in_chunk, (user, item, ts, event_id) in enumerate(rows):
                index = chunk_start + offset_in_chunk
                if skip is not None and skip[index - start_from]:
                    continue
                if sent % _CHECK_EVERY == 0:
                    if acks.errors:
                        return sent
                    bar.update(sent - bar.n)
                if pacer is not None:
                    _wait_until(pacer, index, started)
                key, value = encode_event(user, item, ts, event_id, ts_unit=kafka_config.timestamp_unit,
                                          max_bytes=kafka_config.max_message_bytes)
                future = producer.send(topic, key=key, value=value)
                rel = index - start_from
                future.add_callback(acks.on_ack, rel)
                future.add_errback(acks.on_error, rel)
                sent += 1
        bar.update(sent - bar.n)
    return sent


def _wait_until(pacer: Callable[[int], float] | None, index: int, started: float) -> None:
    if pacer is None:
        return
    delay = started + pacer(index) - time.monotonic()
    if delay > 0.001:
        time.sleep(delay)


def _await_acks(producer: Any, acks: _Acks, kafka_config: KafkaConfig) -> None:
    """Flush with a deadline, in short steps.

    A plain flush() can hang: kafka-python's idempotent producer stops expiring batches once its
    broker is gone. After a delivery error we only wait until acknowledgements stop changing
    (so the reported counts are final), then give up.
    """
    from kafka.errors import KafkaTimeoutError

    deadline = time.monotonic() + (2 * kafka_config.request_timeout_ms + 10) / 1000 + 5
    seen, changed = acks.count, time.monotonic()
    while True:
        try:
            producer.flush(timeout=0.25)
            return
        except KafkaTimeoutError:
            pass
        now = time.monotonic()
        if acks.count != seen:
            seen, changed = acks.count, now
        if acks.errors and now - changed > 1.0:
            return
        if now > deadline:
            acks.on_error(acks.contiguous(), TimeoutError("not acknowledged before the delivery deadline"))
            return


def _already_there(kafka_config: KafkaConfig, topic: str, table: pa.Table, start_from: int) -> np.ndarray:
    """Which rows from `start_from` on the topic already holds (by event_id), as a mask from start_from.

    A run that stopped on a stalled or lost broker knows what was acknowledged, not what landed: sends
    it gave up on may still have been written, and a new producer's idempotence does not cover an old
    one's. Those rows can only be among the last `len(table) - start_from` records of each partition,
    so that many are read back and rows found there are not sent again.
    """
    n = len(table) - start_from
    if start_from == 0 or n == 0:
        return np.zeros(n, dtype=bool)
    from kafka import TopicPartition

    ids: set[int] = set()
    consumer = new_consumer(kafka_config, max_partition_fetch_bytes=1 << 20)
    try:
        with kafka_errors(f"reading the end of {topic!r} before resuming", kafka_config.bootstrap_servers):
            with TopicAdmin(kafka_config) as admin:
                tps = [TopicPartition(topic, p) for p in admin.partitions(topic)]
            ends = end_offsets(kafka_config, topic, [tp.partition for tp in tps])
            begins = {tp.partition: int(o) for tp, o in consumer.beginning_offsets(tps).items()}
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, max(begins[tp.partition], ends[tp.partition] - n))
            deadline = time.monotonic() + 10 * kafka_config.request_timeout_ms / 1000
            while any(consumer.position(tp) < ends[tp.partition] for tp in tps):
                if time.monotonic() > deadline:
                    raise KafkaError(f"timed out reading the end of {topic!r} before resuming")
                for records in consumer.poll(timeout_ms=200).values():
                    for record in records:
                        event = decode_event(record.value, max_bytes=1 << 62)
                        if not isinstance(event, PoisonMessage) and event.event_id is not None:
                            ids.add(int(event.event_id))
    finally:
        consumer.close(autocommit=False)
    there = np.isin(table.column("event_id").to_numpy()[start_from:], np.fromiter(ids, np.int64, len(ids)))
    if there.any():
        log.warning("replay_rows_already_in_topic", topic=topic, rows=int(there.sum()), start_from=start_from,
                    reason="written by the interrupted run without an acknowledgement; not sent again")
    return there


def _replay_error(topic: str, kafka_config: KafkaConfig, acks: _Acks, start_from: int, total: int,
                  cause: str) -> ReplayError:
    contiguous = start_from + acks.contiguous()
    beyond = acks.count - acks.contiguous()
    error = ReplayError(
        f"replay to topic {topic!r} on {kafka_config.bootstrap_servers} stopped: {acks.count} of "
        f"{total - start_from} events acknowledged (rows {start_from}..{total - 1}); every row before "
        f"{contiguous} is acknowledged. Cause: {cause or 'unknown'}. Re-running is safe: recreate the "
        f"topic and replay again (--recreate), or resume with --start-from {contiguous}: rows after it "
        f"that are already in the topic ({beyond} acknowledged, and any written without an "
        "acknowledgement) are found there by event_id and not sent again.")
    error.acknowledged = acks.count  # type: ignore[attr-defined]
    error.next_index = contiguous  # type: ignore[attr-defined]
    log.error("replay_failed", topic=topic, acknowledged=acks.count, next_index=contiguous, cause=cause[:300])
    return error


def _write_meta(kafka_config: KafkaConfig, topic: str, table: pa.Table, splits: Mapping[str, int] | None,
                acks: _Acks, start_from: int, partitions: int,
                extra: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """One JSON control message on `<topic>.meta` with the split boundaries (after success only)."""
    if not splits and not extra:
        return None
    ts = table.column("timestamp")
    ids = table.column("event_id")
    parts: dict[str, Any] = {}
    for name, row in (splits or {}).items():
        complete = row >= start_from  # offsets of earlier rows were produced by another run
        parts[name] = {"index": int(row),
                       "timestamp": ts[row].as_py() if row < len(table) else None,
                       "event_id": ids[row].as_py() if row < len(table) else None,
                       "offsets": ({str(p): o for p, o in sorted(acks.first_offsets[name].items())}
                                   if complete else None)}
    body = {"v": 1, "topic": topic, "partitions": partitions, "events": len(table),
            "timestamp_unit": kafka_config.timestamp_unit, "splits": parts, **dict(extra or {})}
    meta = meta_topic(topic)
    with TopicAdmin(kafka_config) as admin:
        admin.ensure_topic(meta, 1)
    producer = new_producer(kafka_config, enable_idempotence=True)
    try:
        producer.send(meta, key=META_KEY, value=json.dumps(body).encode("utf-8")).get(
            timeout=kafka_config.request_timeout_ms / 1000)
    except Exception as exc:
        raise ReplayError(f"events replayed, but the split metadata could not be written to {meta!r}: {exc}") from exc
    finally:
        close_producer(producer)
    log.info("replay_meta_written", topic=meta, splits={k: v["index"] for k, v in parts.items()})
    return body


def read_replay_meta(kafka_config: KafkaConfig, topic: str) -> dict[str, Any] | None:
    """The latest control message written by `replay_events` for `topic` (None when there is none)."""
    from kafka import TopicPartition

    meta = meta_topic(topic)
    with TopicAdmin(kafka_config) as admin:
        if not admin.topic_exists(meta):
            return None
    end = end_offsets(kafka_config, meta, [0])[0]
    if end == 0:
        return None
    consumer = new_consumer(kafka_config)
    try:
        tp = TopicPartition(meta, 0)
        consumer.assign([tp])
        consumer.seek(tp, end - 1)
        deadline = time.monotonic() + kafka_config.request_timeout_ms / 1000
        while time.monotonic() < deadline:
            records = consumer.poll(timeout_ms=100).get(tp, [])
            if records:
                return json.loads(records[-1].value)
    finally:
        consumer.close(autocommit=False)
    raise ReplayError(f"could not read the last message of {meta!r} within {kafka_config.request_timeout_ms} ms")


def result_dict(result: ReplayResult) -> dict[str, Any]:
    """JSON-friendly form of a ReplayResult (for the CLI summary)."""
    out = asdict(result)
    out["next_index"] = result.next_index
    return out
