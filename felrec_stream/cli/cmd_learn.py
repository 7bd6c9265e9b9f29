"""`felrec-stream learn`: online learning on the live topic (training/learn.py), publishing weight
versions that `consume --models-dir` adopts (felrec_stream/state/versions.py).

Composition only: options -> the `learn` config section -> broker -> KafkaSource (poison messages
are skipped: the worker dead-letters them) -> Learner.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import click

from felrec_stream.cli.cmd_consume import stop_on_signals
from felrec_stream.cli.group import cli, start_ranks
from felrec_stream.config import LearnConfig, literal_choices

_L = LearnConfig()  # the defaults the help texts show
_LEARN_OPTIONS = ("topic", "batch_size", "lr", "publish_every", "start", "reservoir_size", "replay_ratio",
                  "guard_window", "guard_tolerance", "keep_versions", "seed", "until_end")


@cli.command("learn")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The trained checkpoint the learner starts from (felrec-stream train).")
@click.option("--models-dir", required=True, type=click.Path(file_okay=False),
              help="Where versions are published (consume --models-dir reads them).")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False),
              help="The learner's snapshots [default: <models-dir>/learner].")
@click.option("--topic", default=None, help=f"[default: {_L.topic}]")
@click.option("--from", "start", default=None, type=click.Choice(literal_choices(LearnConfig, "start")),
              help="The first run's start: after the checkpoint's training events, the first event, or the "
                   f"end of the topic (later runs continue from their snapshot) [default: {_L.start}].")
@click.option("--publish-every", default=None, type=click.IntRange(min=1),
              help=f"Events between two versions [default: {_L.publish_every}].")
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="Events per training step [default: the checkpoint's training.batch_size].")
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Constant learning rate [default: the checkpoint's training.lr].")
@click.option("--replay-ratio", default=None, type=click.FloatRange(min=0),
              help=f"Reservoir events per live event in each step [default: {_L.replay_ratio}].")
@click.option("--reservoir-size", default=None, type=click.IntRange(min=0), help=f"[default: {_L.reservoir_size}]")
@click.option("--guard-window", default=None, type=click.IntRange(min=0), help=f"[default: {_L.guard_window}]")
@click.option("--guard-tolerance", default=None, type=click.FloatRange(min=0), help=f"[default: {_L.guard_tolerance}]")
@click.option("--keep-versions", default=None, type=click.IntRange(min=1), help=f"[default: {_L.keep_versions}]")
@click.option("--seed", default=None, type=int, help=f"[default: {_L.seed}]")
@click.option("--until-end", is_flag=True, default=None, help="Stop at the end of the topic (deterministic batches).")
@click.option("--bootstrap-servers", default=None, envvar="FELREC_BOOTSTRAP_SERVERS",
              help="Kafka bootstrap servers; empty: reuse `broker start` or start an embedded broker.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="YAML/JSON config file (kafka and learn sections are used).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
def learn(**opts: Any) -> None:
    """Keep training the encoder on the live topic and publish weight versions, exactly once.

    Runs until SIGTERM/SIGINT (finishes the batch, snapshots, exits 0) or --until-end. Prints a
    JSON summary on stdout. Under `--nproc N` (torchrun) every rank trains a slice of each batch;
    rank 0 alone reads the topic, snapshots and publishes (training/learn_ranks.py).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from connectors.kafka.broker import ensure_broker
    from connectors.kafka.source import KafkaSource
    from felrec_stream.config import KafkaConfig, load_section, read_config_file, replace
    from felrec_stream.device import resolve_device
    from felrec_stream.state.checkpoint import load_checkpoint
    from felrec_stream.state.snapshot import SnapshotManager
    from felrec_stream.state.versions import VersionStore
    from felrec_stream.stream.events import EventBatch
    from felrec_stream.stream.source import InMemorySource, SkipDeadLetters
    from training.learn import Learner
    from training.learn_ranks import LearnFollower

    sections = read_config_file(opts["config_file"])
    config = load_section(LearnConfig, "learn", sections, {name: opts[name] for name in _LEARN_OPTIONS})
    kafka = load_section(KafkaConfig, "kafka", sections, {"bootstrap_servers": opts["bootstrap_servers"],
                                                          "topic": config.topic})
    ranks = start_ranks(sections)
    path = opts["checkpoint"]
    # every rank gets rank 0's checkpoint (the ranks need not share a file system)
    checkpoint = load_checkpoint(path) if ranks is None else ranks.from_leader(lambda: load_checkpoint(path))
    batch_size = config.batch_size or checkpoint.configs.training.batch_size
    models = Path(opts["models_dir"])
    snapshots = SnapshotManager(opts["state_dir"] or models / "learner", keep=config.keep_snapshots)
    device = resolve_device(opts["device"])
    if ranks is not None and not ranks.leader:  # rank > 0: no broker, no snapshots, no versions written
        nothing = InMemorySource(EventBatch.empty())  # followers read no topic: rank 0 sends every batch
        learner = Learner(checkpoint, nothing, VersionStore(models), snapshots, config, device, path, ranks=ranks)
        follower = LearnFollower(learner, ranks)
        with stop_on_signals(follower):  # passed on to rank 0, which stops everyone
            follower.run()
        return
    with ensure_broker(kafka) as servers:
        source = KafkaSource(replace(kafka, bootstrap_servers=servers), config.topic, until_end=config.until_end,
                             batch_size=batch_size, max_wait_s=1e9 if config.until_end else 0.05,
                             dead_letters=SkipDeadLetters())
        learner = Learner(checkpoint, source, VersionStore(models), snapshots, config, device, path, ranks=ranks)
        with stop_on_signals(learner):
            result = learner.run()
    click.echo(json.dumps(dataclasses.asdict(result), default=str))
