"""`felrec-stream consume`: the streaming worker (Kafka -> FELRec encoder -> sharded FAISS store).

Composition only: options -> configs -> broker (embedded when no servers are given) -> worker
(pipelines.worker) -> optional metrics endpoint and query service. Guarantees are documented in
pipelines/worker.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import click

from felrec_stream.cli.group import cli, start_ranks
from felrec_stream.config import CacheConfig, WorkerConfig, literal_choices

if TYPE_CHECKING:
    from felrec_stream.parallel import Ranks
    from pipelines.worker import StreamWorker

_W = WorkerConfig()  # the defaults the help texts show
# Options that set fields of the `worker` config section (config file < FELREC_WORKER__<FIELD> < option).
_WORKER_OPTIONS = ("topic", "batch_size", "max_wait_ms", "until_end", "max_events", "snapshot_every_events",
                   "snapshot_every_seconds", "keep_snapshots", "allow_model_change", "reset_state", "group_id",
                   "models_dir", "backfill")


@cli.command("consume")
@click.option("--topic", default=None, help=f"Topic of interaction events [default: {_W.topic}].")
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Trained FELRec checkpoint (felrec-stream train).")
@click.option("--bootstrap-servers", default=None, envvar="FELREC_BOOTSTRAP_SERVERS",
              help="Kafka bootstrap servers; empty: reuse `broker start` or start an embedded broker.")
@click.option("--dead-letter-topic", default=None, help="Where poison messages go [default: <topic>.dlq].")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="YAML/JSON config file (kafka, cache and worker sections are used).")
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help=f"[default: {_W.batch_size}]")
@click.option("--max-wait-ms", default=None, type=click.IntRange(min=0),
              help=f"Follow mode: cut a short batch when its oldest event waited this long "
                   f"[default: {_W.max_wait_ms}].")
@click.option("--shards", default=None, type=click.IntRange(min=1),
              help="FAISS shards per kind (default: cache config).")
@click.option("--index-type", default=None, type=click.Choice(literal_choices(CacheConfig, "index_type")))
@click.option("--max-entities", default=None, type=click.IntRange(min=0),
              help="Users and items (each) kept in memory; the least recently touched spill to Parquet "
                   "files in <snapshot-dir>/spill and come back on their next event. 0: no cap "
                   "[default: cache config].")
@click.option("--snapshot-dir", default=None, type=click.Path(file_okay=False),
              help="Snapshot directory [default: $FELREC_HOME/snapshots/<topic>].")
@click.option("--snapshot-every-events", default=None, type=click.IntRange(min=1),
              help=f"[default: {_W.snapshot_every_events}]")
@click.option("--snapshot-every-seconds", default=None, type=click.FloatRange(min=0.001),
              help=f"[default: {_W.snapshot_every_seconds}]")
@click.option("--keep-snapshots", default=None, type=click.IntRange(min=1), help=f"[default: {_W.keep_snapshots}]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--metrics-port", default=None, type=click.IntRange(1, 65535), help="Prometheus /metrics on 127.0.0.1.")
@click.option("--max-events", default=None, type=click.IntRange(min=1),
              help="Stop at the first batch boundary after this many events (tests).")
@click.option("--until-end", is_flag=True, default=None, help="Stop at the end of the topic (deterministic batches).")
@click.option("--allow-model-change", is_flag=True, default=None,
              help="Restore a snapshot made with another checkpoint.")
@click.option("--reset-state", is_flag=True, default=None,
              help="When the snapshots cannot be used (the topic was deleted and recreated, or none is valid and "
                   "the topic no longer starts at offset 0), discard them and start from the topic's earliest "
                   "offsets instead of refusing. A usable snapshot is always restored.")
@click.option("--group-id", default=None,
              help="Consumer group for monitoring commits [default: felrec-consume-<topic>].")
@click.option("--models-dir", default=None, type=click.Path(file_okay=False),
              help="Adopt the weight versions `felrec-stream learn` publishes here (between batches, exactly once).")
@click.option("--backfill", default=None, type=click.IntRange(min=0),
              help="After each batch, re-encode the K most popular items written by older weights "
                   f"[default: {_W.backfill}].")
@click.option("--serve", is_flag=True, help="Also answer recommendation queries over HTTP from the live store.")
@click.option("--http-host", default="127.0.0.1", show_default=True,
              help="Address of the query API (no authentication: keep it on loopback unless proxied).")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
def consume(**opts: Any) -> None:
    """Apply a topic of interactions to the representation store, exactly once, with snapshots.

    Runs until SIGTERM/SIGINT (finishes the batch in progress, writes a final snapshot, exits 0),
    or until --until-end / --max-events. Prints a JSON summary on stdout.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch/faiss load (2-core hosts)
    from connectors.kafka.broker import ensure_broker
    from felrec_stream.config import KafkaConfig, env_overrides, load_section, read_config_file, replace
    from pipelines.worker import build_worker

    sections = read_config_file(opts["config_file"])
    config = load_section(WorkerConfig, "worker", sections, {name: opts[name] for name in _WORKER_OPTIONS})
    if not config.group_id:
        config = replace(config, group_id=f"felrec-consume-{config.topic}")
    kafka = load_section(KafkaConfig, "kafka", sections, {"bootstrap_servers": opts["bootstrap_servers"],
                                                          "topic": config.topic,
                                                          "dead_letter_topic": opts["dead_letter_topic"]})
    if not (opts["dead_letter_topic"] or "dead_letter_topic" in sections.get("kafka", {})
            or "dead_letter_topic" in env_overrides("kafka")):
        kafka = replace(kafka, dead_letter_topic=f"{config.topic}.dlq")  # one dead-letter topic per topic
    ranks = start_ranks(sections)
    if ranks is not None and not ranks.leader:
        _follow(ranks, opts)  # rank > 0: no broker, no snapshots, no HTTP; applies what rank 0 sends
        return
    with ensure_broker(kafka) as servers:
        worker = build_worker(opts["checkpoint"], replace(kafka, bootstrap_servers=servers), config,
                              shards=opts["shards"], index_type=opts["index_type"],
                              max_entities=opts["max_entities"], device=opts["device"],
                              snapshot_dir=opts["snapshot_dir"] or _default_snapshot_dir(config.topic), ranks=ranks)
        if opts["metrics_port"]:
            worker.metrics.serve(opts["metrics_port"])
        with stop_on_signals(worker), _maybe_serve(worker, opts["serve"], opts["http_host"], opts["http_port"]):
            result = worker.run()
    click.echo(json.dumps(dataclasses.asdict(result), default=str))


def _follow(ranks: Ranks, opts: dict[str, Any]) -> None:
    from pipelines.replicas import build_follower

    follower = build_follower(opts["checkpoint"], ranks, shards=opts["shards"], index_type=opts["index_type"],
                              device=opts["device"])
    with stop_on_signals(follower):  # passed on to rank 0, which stops everyone
        follower.run()


def _default_snapshot_dir(topic: str) -> Path:
    home = os.environ.get("FELREC_HOME")
    return (Path(home) if home else Path.home() / ".felrec-stream") / "snapshots" / topic


class Stoppable(Protocol):
    """What `stop_on_signals` stops: the worker, a follower rank, the learner."""

    @property
    def stopping(self) -> bool: ...

    def request_stop(self, reason: str = "signal") -> None: ...


@contextlib.contextmanager
def stop_on_signals(worker: Stoppable) -> Iterator[None]:
    """SIGTERM/SIGINT -> graceful stop (finish batch, final snapshot, exit 0); a second one aborts
    at once (exit 130, no final snapshot: the previous snapshot stays the restart point)."""
    def handler(signum: int, _frame: Any) -> None:
        if worker.stopping:
            raise KeyboardInterrupt
        worker.request_stop(f"signal:{signal.Signals(signum).name}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _maybe_serve(worker: StreamWorker, serve: bool, host: str, port: int) -> Iterator[None]:
    """Query service on the live store, sharing the worker's lock (felrec_stream.serving.query, .app)."""
    if not serve:
        yield
        return
    from felrec_stream.serving.app import create_app, serve_in_thread
    from felrec_stream.serving.query import ColdStartEncoder, QueryEngine

    # the model is in-process: unknown users get cold-start recommendations, from the weights in use
    # (worker.bundle is read per request: online learning swaps it)
    bundle = worker.bundle
    engine = QueryEngine(worker.store, worker.lock, scoring=bundle.configs.scoring,
                         cold_start=lambda user_id: ColdStartEncoder(worker.bundle.model, bundle.cache)(user_id),
                         committed_sizes=worker.committed_sizes)
    worker.observers.append(engine)  # freshness and snapshot seq on /metrics and /v1/catalog
    # not ready (503) until the snapshot is restored: an empty store would answer 404s
    handle = serve_in_thread(create_app(lambda: engine if worker.ready else None), host=host, port=port)
    try:
        yield
    finally:
        handle.stop()
