"""Prometheus metrics of the streaming worker, on a private registry.

Why a private registry: tests and benchmarks build several workers in one process; the global
default registry would refuse the second set of metric names. `serve(port)` exposes it with
prometheus_client's HTTP server bound to 127.0.0.1 (metrics are not meant to leave the host
without a scraper/proxy in front).

Metric names (all prefixed `felrec_worker_`):
    events_total                 counter   events applied (rate() = events/s)
    batches_total                counter   micro-batches applied
    batch_latency_seconds        histogram read -> encode -> FAISS write of one micro-batch
    lock_held_seconds            histogram time queries wait on one micro-batch (id registration +
                                           store write; the encoder runs without the lock)
    consumer_lag                 gauge     records behind the high watermark, per partition
    cache_entities{kind}         gauge     users / items in the store
    resident_entities{kind}      gauge     of those, held in memory (the rest are spilled to
                                           Parquet under cache.max_entities; equal without a cap)
    snapshot_duration_seconds    histogram one durable snapshot (state + fsync + CURRENT switch)
    dead_letters_total           counter   poison messages sent to the dead-letter topic
    late_events_total            counter   events released after a later one (follow mode only)
    event_to_update_seconds      histogram wall time from the event (or its Kafka write) to the
                                           store update; see pipelines.worker for which clock
    applied_events               gauge     events applied since the topic start (restored too)
    model_version                gauge     seq of the published weight version in use (0: the checkpoint)
    seconds_since_model_swap     gauge     since the last version switch (or the start)
    stale_vectors_share{kind}    gauge     share of written vectors last written by older weights
    model_swap_pause_seconds     histogram one version switch (load + swap + followers)
"""

from __future__ import annotations

from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from felrec_stream.errors import ServiceError

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LOCK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_E2U_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


class WorkerMetrics:
    """The worker's metric objects; one instance per worker."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, "felrec_worker_"
        self.events = Counter(p + "events", "Events applied to the store", registry=r)
        self.batches = Counter(p + "batches", "Micro-batches applied", registry=r)
        self.batch_latency = Histogram(p + "batch_latency_seconds", "Encode + store update time of a micro-batch",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.lock_held = Histogram(p + "lock_held_seconds", "Query lock held per micro-batch (register + write)",
                                   buckets=_LOCK_BUCKETS, registry=r)
        self.lag = Gauge(p + "consumer_lag", "Records behind the high watermark", ["partition"], registry=r)
        self.cache = Gauge(p + "cache_entities", "Entities in the representation store", ["kind"], registry=r)
        self.resident = Gauge(p + "resident_entities", "Entities held in memory (the rest are spilled)", ["kind"],
                              registry=r)
        self.snapshot_duration = Histogram(p + "snapshot_duration_seconds", "Durable snapshot write time",
                                           buckets=_LATENCY_BUCKETS, registry=r)
        self.dead_letters = Counter(p + "dead_letters", "Poison messages sent to the dead-letter topic", registry=r)
        self.late_events = Counter(p + "late_events", "Events released after a later event", registry=r)
        self.event_to_update = Histogram(p + "event_to_update_seconds", "Event (or Kafka write) to store update",
                                         buckets=_E2U_BUCKETS, registry=r)
        self.applied = Gauge(p + "applied_events", "Events applied since the topic start", registry=r)
        self.model_version = Gauge(p + "model_version", "Seq of the weight version in use (0: checkpoint)", registry=r)
        self.since_swap = Gauge(p + "seconds_since_model_swap", "Seconds since the last version switch", registry=r)
        self.stale = Gauge(p + "stale_vectors_share", "Vectors written by older weights", ["kind"], registry=r)
        self.swap_pause = Histogram(p + "model_swap_pause_seconds", "One weight version switch",
                                    buckets=_LOCK_BUCKETS, registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics on addr:port in a daemon thread (ServiceError when the port is taken)."""
        try:
            start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise ServiceError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from None

    def observe_batch(self, size: int, seconds: float, dead_letters: int, late: int, applied: int,
                      users: int, items: int) -> None:
        self.events.inc(size)
        self.batches.inc()
        self.batch_latency.observe(seconds)
        if dead_letters:
            self.dead_letters.inc(dead_letters)
        if late:
            self.late_events.inc(late)
        self.applied.set(applied)
        self.cache.labels(kind="user").set(users)
        self.cache.labels(kind="item").set(items)

    def set_resident(self, users: int, items: int) -> None:
        self.resident.labels(kind="user").set(users)
        self.resident.labels(kind="item").set(items)

    def set_versions(self, seq: int, since_swap_s: float, stale: Mapping[str, float]) -> None:
        self.model_version.set(seq)
        self.since_swap.set(since_swap_s)
        for kind, share in stale.items():
            self.stale.labels(kind=kind).set(share)

    def set_lag(self, lag: Mapping[int, int]) -> None:
        for partition, value in lag.items():
            self.lag.labels(partition=str(partition)).set(value)
