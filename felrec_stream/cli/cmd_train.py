"""`felrec-stream train` and `felrec-stream evaluate`: thin wrappers around training.train / evaluate.

Both work on an events table (`load_events`): a dataset file, or a Kafka topic replayed from its
beginning in time order (`--topic`), which gives the same table and hence the same results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from felrec_stream.cli.group import cli, parse_key_values, start_ranks
from felrec_stream.config import (EVAL_MODES, EVAL_PROTOCOLS, PRESET_DESCRIPTIONS, PRESETS, Configs, ModelConfig,
                                  literal_choices, merge_sections, preset_sections, read_config_file)

DATASET_HELP = ("Dataset name (ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-latest, twitch, csv, parquet, "
                "synthetic).")


def load_events(dataset: str | None, path: str | None, cache_dir: str | None, options: dict[str, Any],
                topic: str | None = None, bootstrap_servers: str | None = None) -> Any:
    """The canonical events table of a dataset, or of a whole topic read in event-time order."""
    if topic is not None:
        return _read_topic(topic, bootstrap_servers)
    if dataset is None:
        raise click.UsageError("give --dataset (with --path) or --topic")
    from connectors.datasets import load_dataset

    return load_dataset(dataset, path, cache_dir=cache_dir, **options)


def _read_topic(topic: str, bootstrap_servers: str | None) -> Any:
    from connectors.kafka.admin import TopicAdmin
    from connectors.kafka.broker import ensure_broker
    from connectors.kafka.source import read_topic_table
    from felrec_stream.config import KafkaConfig, replace
    from felrec_stream.errors import KafkaError

    kafka = KafkaConfig(bootstrap_servers=bootstrap_servers or "", topic=topic)
    with ensure_broker(kafka) as servers:
        kafka = replace(kafka, bootstrap_servers=servers)
        with TopicAdmin(kafka) as admin:
            if not admin.topic_exists(topic):
                raise KafkaError(f"topic {topic!r} does not exist on {servers}; fill it with `felrec-stream replay`")
        return read_topic_table(kafka, topic)


def _label(dataset: str | None, path: str | None) -> str | None:
    """The dataset's name in reports (the file's name for csv/parquet)."""
    from connectors.datasets import dataset_label

    return dataset_label(dataset, path) if dataset else None


def _dataset_options(func: Any) -> Any:
    func = click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                        help="Folder for a Parquet cache of the parsed dataset (default: no cache).")(func)
    func = click.option("--dataset-option", "dataset_options", multiple=True, metavar="KEY=VALUE",
                        help="Loader option, repeatable (e.g. size=medium for synthetic, delimiter=; for csv).")(func)
    func = click.option("--path", type=click.Path(exists=True), default=None,
                        help="Dataset file or folder (e.g. ../shared/data/ml-100k). Not for synthetic.")(func)
    func = click.option("--bootstrap-servers", default=None, envvar="FELREC_BOOTSTRAP_SERVERS",
                        help="Kafka bootstrap servers for --topic; empty: the embedded broker of "
                             "`felrec-stream broker start` / `replay`.")(func)
    func = click.option("--topic", default=None,
                        help="Read the events from this Kafka topic (from its beginning, in event-time order) "
                             "instead of --dataset.")(func)
    return click.option("--dataset", default=None, help=DATASET_HELP + " Required unless --topic is given.")(func)


@cli.command("train")
@_dataset_options
@click.option("--variant", type=click.Choice(literal_choices(ModelConfig, "variant")), default=None,
              help="FELRec-Q (queue + InfoNCE) or FELRec-P (predictor, BYOL-style). Default: model.variant (q).")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="Named starting configuration below --config (times for 100k events on 2 CPU cores; "
                   "a GPU or fewer --epochs take less). "
                   + " ".join(f"{name}: {text}." for name, text in PRESET_DESCRIPTIONS.items()))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML/JSON file with encoder/model/training/eval/cache sections; FELREC_<SECTION>__<FIELD> "
                   "environment variables override it, these options override both.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (training.epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Events per training micro-batch (training.batch_size).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak SGD learning rate after warm-up (training.lr).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="auto = cuda when available, else cpu (training.device).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/felrec", show_default=True,
              help="Folder for last.pt, best.pt and train_result.json.")
@click.option("--resume", is_flag=True, help="Continue from <out>/last.pt (same encoder/model/cache configs).")
def train_command(dataset: str | None, path: str | None, dataset_options: tuple[str, ...], cache_dir: str | None,
                  topic: str | None, bootstrap_servers: str | None, variant: str | None, preset: str | None,
                  config_file: str | None, epochs: int | None, batch_size: int | None,
                  lr: float | None, device: str | None, out_dir: str, resume: bool) -> None:
    """Train FELRec on the first (1 - val - test) of a dataset's events in time order.

    After every epoch the validation events are scored online; the last and the best checkpoint
    (lowest validation rank) are written to --out. Evaluate them with `felrec-stream evaluate`.
    """
    import json

    from training.train import train

    cfgs = _load_configs(config_file, {"model": {"variant": variant},
                                       "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                                                    "device": device}}, preset)
    ranks = start_ranks(read_config_file(config_file))
    load = lambda: load_events(dataset, path, cache_dir, parse_key_values(dataset_options),  # noqa: E731
                               topic, bootstrap_servers)
    events = load() if ranks is None else ranks.from_leader(load)  # one read of a file or topic, sent to all
    result = train(events, cfgs, out_dir, resume=resume, ranks=ranks)
    if ranks is not None and not ranks.leader:
        return  # rank 0 writes and prints
    summary = {"dataset": _label(dataset, path), "topic": topic, "epochs_completed": result.epochs_completed,
               "best_epoch": result.best_epoch,
               "best_val_rank": result.best_val_rank, "last_checkpoint": str(result.last_checkpoint),
               "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
               "history": result.history}
    Path(out_dir, "train_result.json").write_text(json.dumps(summary, indent=2))
    click.echo(f"trained {result.epochs_completed} epoch(s); best validation rank {result.best_val_rank:.4f} "
               f"at epoch {result.best_epoch}; checkpoints: {result.best_checkpoint}, {result.last_checkpoint}")


def _load_configs(config_file: str | None, overrides: dict[str, dict[str, Any]],
                  preset: str | None = None) -> Configs:
    """preset < config file < environment < the options that were given."""
    return Configs.load(merge_sections(preset_sections(preset), read_config_file(config_file)), overrides)


@cli.command("evaluate")
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A checkpoint written by `felrec-stream train` (best.pt or last.pt).")
@_dataset_options
@click.option("--mode", type=click.Choice(list(EVAL_MODES)), default=None,
              help="keep: continue from the training cache; reset: same weights, empty cache; zero-shot: "
                   "weights trained on another dataset, empty cache. Default: the checkpoint's eval.mode (keep).")
@click.option("--nn", "nn", is_flag=True, help="Also report FELRec-NN (scores averaged over the user's "
                                               "eval.nn_neighbors nearest users).")
@click.option("--baseline", type=click.Choice(["popularity", "popularity-recent", "none"]), default="popularity",
              show_default=True, help="Baseline row evaluated on the same events (popularity-recent: counts "
                                      "decayed with the checkpoint's cache.popularity_halflife).")
@click.option("--protocol", type=click.Choice(list(EVAL_PROTOCOLS)), default=None,
              help="serve: score each event with what was served just before it, then apply it (what a "
                   "deployed system can do); paper: encode and write the event's user and item first, then "
                   "score (the reference's protocol, no popularity prior). Default: the checkpoint's eval.protocol.")
@click.option("--batch-size", "eval_batch_size", type=click.IntRange(min=1), default=None,
              help="Events per evaluation micro-batch (default: the checkpoint's eval.batch_size). Scores are "
                   "per event whatever the batch; only the encodings' pre-batch cache reads depend on it.")
@click.option("--split", "split_name", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="Score the test events (after replaying validation) or the validation events: choose "
                   "settings on val, report test.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for report.md, <model>.json, <model>.parquet (per event) and rank_vs_prior.png.")
def evaluate_command(checkpoint_path: str, dataset: str | None, path: str | None, dataset_options: tuple[str, ...],
                     cache_dir: str | None, topic: str | None, bootstrap_servers: str | None, mode: str | None,
                     nn: bool, baseline: str, protocol: str | None, eval_batch_size: int | None, split_name: str,
                     out_dir: str | None) -> None:
    """Score the test events online (after replaying the validation events) and print Table 1.

    The split is the checkpoint's (training.val_fraction / test_fraction), so keep/reset use the
    same test events as training held out. Partitions: observed, new users, new items (relative
    to the training events) and the first interaction of an item.
    """
    from felrec_stream.config import ScoringConfig, replace
    from felrec_stream.data.split import Split, chronological_split
    from felrec_stream.device import resolve_device
    from felrec_stream.state.checkpoint import load_checkpoint
    from training.evaluate import evaluate_and_report
    from training.felrec_online import PopularityOnline, build_felrec

    ranks = start_ranks()
    read = lambda: (load_checkpoint(checkpoint_path),  # noqa: E731
                    load_events(dataset, path, cache_dir, parse_key_values(dataset_options), topic, bootstrap_servers))
    checkpoint, events = read() if ranks is None else ranks.from_leader(read)  # rank 0 reads, all get it
    cfgs = checkpoint.configs
    mode = mode or cfgs.eval.mode
    dataset = _label(dataset, path) if dataset else f"topic {topic}"
    split = chronological_split(events, cfgs.training.val_fraction, cfgs.training.test_fraction)
    # a checkpoint trained on a GPU stays usable on a machine without one
    device = resolve_device(cfgs.training.device if cfgs.training.device != "cuda" else "auto")
    if ranks is not None:
        device = ranks.place(device)
    protocol = protocol or cfgs.eval.protocol
    if protocol == "paper":  # the reference's protocol and score: no popularity prior
        checkpoint = replace(checkpoint, configs=replace(cfgs, scoring=ScoringConfig()))
    if split_name == "val":  # score validation: nothing is replayed before it but the training cache
        split = Split(split.train, split.val.slice(0, 0), split.val)
    models = [build_felrec(checkpoint, mode, device, protocol=protocol, ranks=ranks)]
    if nn:
        models.append(build_felrec(checkpoint, mode, device, nn_neighbors=cfgs.eval.nn_neighbors, protocol=protocol,
                                   ranks=ranks))
    if baseline != "none":
        halflife = cfgs.cache.popularity_halflife if baseline == "popularity-recent" else 0.0
        models.append(PopularityOnline([split.train], halflife))
    title = f"{dataset}: {split_name} events {len(split.test)}, mode {mode}"
    leader = ranks is None or ranks.leader
    eval_cfg = replace(cfgs.eval, protocol=protocol, batch_size=eval_batch_size or cfgs.eval.batch_size)
    report = evaluate_and_report(models, split, eval_cfg, title, out_dir if leader else None,
                                 plot_title=f"{dataset} ({mode}, {protocol})", exclude_recent=cfgs.excluded_recent)
    if not leader:
        return  # the same report; rank 0 writes and prints it
    click.echo(report)
    if out_dir:
        click.echo(f"results written to {out_dir}")
