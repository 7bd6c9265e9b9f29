"""`felrec-stream quickstart`: the whole streaming path in one command, on the embedded broker.

broker (embedded unless --bootstrap-servers) -> replay a dataset into a topic -> train FELRec by
replaying the topic in time order -> evaluate online on the test split next to popularity ->
print the Table-1 report. Sized to finish in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from felrec_stream.cli.group import cli

# The "small" preset: trains in about a minute on 2 CPU cores and learns the synthetic clusters.
QUICKSTART_PRESET = "small"


@cli.command("quickstart")
@click.option("--dataset", default="synthetic", show_default=True,
              help="Dataset replayed into the topic (connectors.datasets name, e.g. synthetic, ml-100k).")
@click.option("--path", default=None, type=click.Path(exists=True), help="Dataset file or folder (not for synthetic).")
@click.option("--topic", default="quickstart.interactions", show_default=True, help="Topic (recreated).")
@click.option("--partitions", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="Training epochs [default: the preset's].")
@click.option("--bootstrap-servers", default=None, envvar="FELREC_BOOTSTRAP_SERVERS",
              help="Use this Kafka cluster instead of starting the embedded broker.")
@click.option("--out", "out_dir", default="runs/quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Checkpoints, per-event results, report.md and rank_vs_prior.png.")
def quickstart(dataset: str, path: str | None, topic: str, partitions: int, epochs: int | None,
               bootstrap_servers: str | None, out_dir: str) -> None:
    """Broker -> replay -> train from the topic -> online evaluation -> report, in one go."""
    from connectors.datasets import dataset_label, load_dataset
    from connectors.kafka.broker import ensure_broker
    from felrec_stream.config import KafkaConfig, preset_sections
    from felrec_stream.log import get_logger

    log = get_logger("quickstart")
    started = time.perf_counter()
    kafka = KafkaConfig(bootstrap_servers=bootstrap_servers or "", topic=topic, partitions=partitions)
    table = load_dataset(dataset, path)
    with ensure_broker(kafka) as servers:
        events = replay_and_read_back(table, KafkaConfig(**{**kafka.__dict__, "bootstrap_servers": servers}))
    log.info("quickstart_topic_read", events=len(events), seconds=round(time.perf_counter() - started, 1))
    overrides = preset_sections(QUICKSTART_PRESET)
    # The synthetic stream is repeat consumption (about 65% of its events repeat an item of the user's
    # last 64, as on Twitch): there the served ranking must keep seen items, so this run does not
    # leave them out (scoring.exclude_recent; the README's real-data tables do).
    overrides["scoring"] = {**overrides.get("scoring", {}), "exclude_recent": False}
    if epochs is not None:
        overrides["training"]["epochs"] = epochs
    title = f"quickstart: {dataset_label(dataset, path)} via topic {topic}"
    report = train_and_report(events, overrides, Path(out_dir), title=title)
    click.echo(report)
    click.echo(f"done in {time.perf_counter() - started:.0f} s; outputs in {out_dir}")


def replay_and_read_back(table: Any, kafka: Any) -> Any:
    """Recreate the topic, produce the events in time order, read the topic back as an event table."""
    from connectors.kafka.admin import TopicAdmin
    from connectors.kafka.replay import replay_events
    from connectors.kafka.source import read_topic_table
    from felrec_stream.errors import KafkaError

    with TopicAdmin(kafka) as admin:
        admin.recreate_topic(kafka.topic, kafka.partitions)
    result = replay_events(table, kafka, kafka.topic, progress=False)
    if result.acknowledged != len(table):
        raise KafkaError(f"replay acknowledged {result.acknowledged} of {len(table)} events")
    return read_topic_table(kafka, kafka.topic)


def train_and_report(events: Any, overrides: dict[str, dict[str, Any]], out: Path, title: str) -> str:
    """Train on the events' training split, evaluate the best checkpoint and popularity; Table 1."""
    from felrec_stream.config import Configs
    from felrec_stream.data.split import chronological_split
    from felrec_stream.device import resolve_device
    from felrec_stream.state.checkpoint import load_checkpoint
    from training.evaluate import evaluate_and_report
    from training.felrec_online import PopularityOnline, build_felrec
    from training.train import train

    cfgs = Configs.load(overrides)
    result = train(events, cfgs, out / "model")
    checkpoint = load_checkpoint(result.best_checkpoint or result.last_checkpoint)
    split = chronological_split(events, cfgs.training.val_fraction, cfgs.training.test_fraction)
    models = [build_felrec(checkpoint, "keep", resolve_device(cfgs.training.device)), PopularityOnline([split.train])]
    return evaluate_and_report(models, split, cfgs.eval, title, out, exclude_recent=cfgs.excluded_recent)
