"""`felrec-stream broker start|stop|status` and `felrec-stream replay`: thin wrappers over connectors.kafka.

Commands parse options and call into `connectors`; heavy imports (kafka, pyarrow) happen inside
the functions so that `--help` stays fast.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from felrec_stream.cli.group import cli, parse_key_values


@cli.group("broker")
def broker() -> None:
    """The embedded Kafka-protocol broker (Tansu, memory storage) for zero-setup runs.

    State (pid, port, log) lives in $FELREC_HOME/broker (default ~/.felrec-stream/broker); other
    commands without --bootstrap-servers find and use this broker. Data lives only as long as the
    broker process.
    """


@broker.command("start")
@click.option("--port", default=None, type=click.IntRange(1, 65535), help="Loopback port [default: a free one].")
def broker_start(port: int | None) -> None:
    """Start the broker in the background and print its bootstrap address."""
    from connectors.kafka.broker import EmbeddedBroker, find_running

    running = find_running()
    if running is not None:
        click.echo(f"already running: {running.bootstrap_servers} (pid {running.pid})", err=True)
        click.echo(running.bootstrap_servers)
        return
    servers = EmbeddedBroker(port=port, daemon=True).start()
    click.echo(servers)


@broker.command("stop")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds to wait after SIGTERM before SIGKILL.")
def broker_stop(timeout: float) -> None:
    """Stop the broker started by `broker start` (its data is lost)."""
    from connectors.kafka.broker import EmbeddedBroker

    stopped = EmbeddedBroker().stop(timeout_s=timeout)
    click.echo("stopped" if stopped else "not running")


@broker.command("status")
def broker_status() -> None:
    """Print the broker state as JSON; exit code 1 when it is not running."""
    from connectors.kafka.broker import EmbeddedBroker

    status = EmbeddedBroker().status()
    click.echo(json.dumps({"running": status.running, "pid": status.pid, "bootstrap_servers": status.bootstrap_servers,
                           "state_dir": str(status.state_dir)}))
    if not status.running:
        sys.exit(1)


@cli.command("replay")
@click.option("--dataset", required=True,
              help="Dataset name (connectors.datasets), e.g. ml-100k, twitch, synthetic, csv.")
@click.option("--path", default=None, type=click.Path(exists=True), help="Dataset file or folder.")
@click.option("--dataset-option", "--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Dataset loader option (repeatable), e.g. size=medium for synthetic.")
@click.option("--topic", default="interactions", show_default=True)
@click.option("--partitions", default=None, type=click.IntRange(min=1),
              help="Partitions when the topic is created [default: kafka.partitions, 1].")
@click.option("--rate", default=None, type=click.FloatRange(min=0, min_open=True), help="At most this many events/s.")
@click.option("--speedup", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Replay event time this many times faster than real time.")
@click.option("--bootstrap-servers", default=None, envvar="FELREC_BOOTSTRAP_SERVERS",
              help="Kafka bootstrap servers; empty: use (or start and keep) the embedded broker.")
@click.option("--recreate", is_flag=True, help="Delete and recreate the topic first (the safe way to re-run).")
@click.option("--start-from", default=0, show_default=True, type=click.IntRange(min=0),
              help="Resume at this row of the time-ordered dataset (as reported by a failed replay).")
@click.option("--val-fraction", default=0.1, show_default=True, type=float, help="Published split boundary.")
@click.option("--test-fraction", default=0.1, show_default=True, type=float, help="Published split boundary.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="YAML/JSON config file (the kafka section is used).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def replay(**opts: Any) -> None:
    """Produce a dataset's events to a topic in event-time order; prints a JSON summary.

    The topic is created with --partitions when missing (never auto-created). Split boundaries
    (where validation and test begin) are published on <topic>.meta.
    """
    if opts["rate"] is not None and opts["speedup"] is not None:
        raise click.UsageError("give --rate or --speedup, not both")
    from connectors.datasets import load_dataset
    from connectors.kafka.broker import ensure_broker
    from connectors.kafka.replay import prepare_events, replay_events, result_dict, split_indices
    from felrec_stream.config import KafkaConfig, load_section, read_config_file, replace

    kafka = load_section(KafkaConfig, "kafka", read_config_file(opts["config_file"]),
                         {"bootstrap_servers": opts["bootstrap_servers"], "topic": opts["topic"],
                          "partitions": opts["partitions"]})
    # every event is checked (file and line) before a broker or topic is touched
    options: dict[str, Any] = {**parse_key_values(opts["options"])}
    if options.setdefault("timestamp_unit", kafka.timestamp_unit) != kafka.timestamp_unit:
        raise click.UsageError(f"the file's timestamp_unit {options['timestamp_unit']!r} differs from the topic's "
                               f"kafka.timestamp_unit {kafka.timestamp_unit!r}")
    table = prepare_events(load_dataset(opts["dataset"], opts["path"], future_skew_s=kafka.future_skew_s, **options),
                           kafka)
    with ensure_broker(kafka, keep=True) as servers:
        kafka = replace(kafka, bootstrap_servers=servers)
        created = _prepare_topic(kafka, opts["recreate"], opts["start_from"])
        try:
            result = replay_events(table, kafka, kafka.topic, rate=opts["rate"], speedup=opts["speedup"],
                                   progress=opts["progress"], start_from=opts["start_from"],
                                   splits=split_indices(len(table), opts["val_fraction"], opts["test_fraction"]),
                                   meta={"dataset": opts["dataset"], "path": opts["path"]})
        except Exception as exc:
            if created and not getattr(exc, "acknowledged", 0):
                _remove_empty_topic(kafka)
            raise
    click.echo(json.dumps({**result_dict(result), "bootstrap_servers": servers}, default=str))


def _prepare_topic(kafka: Any, recreate: bool, start_from: int) -> bool:
    """Create or recreate the topic explicitly; refuse to append a second full copy of a dataset.
    Returns True when this call created the topic."""
    from connectors.kafka.admin import TopicAdmin, end_offsets
    from connectors.kafka.replay import meta_topic
    from felrec_stream.errors import KafkaError

    with TopicAdmin(kafka) as admin:
        if recreate:
            admin.recreate_topic(kafka.topic, kafka.partitions)
            admin.delete_topic(meta_topic(kafka.topic))
            return True
        if not admin.topic_exists(kafka.topic):
            admin.create_topic(kafka.topic, kafka.partitions, exists_ok=True)
            return True
        admin.ensure_topic(kafka.topic, kafka.partitions)
    held = sum(end_offsets(kafka, kafka.topic).values())
    if held and start_from == 0:
        raise KafkaError(f"topic {kafka.topic!r} already holds {held} record(s): use --recreate to replay from "
                         "scratch, or --start-from N to resume an interrupted replay")
    return False


def _remove_empty_topic(kafka: Any) -> None:
    """A replay that failed before any event was acknowledged leaves no empty topic behind (best effort)."""
    import contextlib

    from connectors.kafka.admin import TopicAdmin
    from felrec_stream.errors import KafkaError
    from felrec_stream.log import get_logger

    with contextlib.suppress(KafkaError), TopicAdmin(kafka) as admin:
        admin.delete_topic(kafka.topic)
        get_logger(__name__).warning("replay_topic_removed", topic=kafka.topic, reason="nothing was acknowledged")
