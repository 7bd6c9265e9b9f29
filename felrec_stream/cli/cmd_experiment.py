"""`experiment`: the paper's Tables 1-3 and Figure 2 for one dataset, in one resumable command."""

from __future__ import annotations

from pathlib import Path

import click

from felrec_stream.cli.group import cli, parse_key_values

DEFAULT_MODELS = "felrec-q,felrec-p,sasrec,gru4rec,gru4rec-bptt,bpr-mf,jodie,popularity"


def _load(spec: str, path: str | None = None, options: dict[str, str] | None = None):  # -> (label, pa.Table)
    from connectors.datasets import dataset_label, load_dataset

    return dataset_label(spec, path), load_dataset(spec, path, **(options or {}))


def _zero_shot(value: str | None):
    """"DATASET:PATH" (or "DATASET" for generated ones such as synthetic) -> (label, events) or None."""
    if not value:
        return None
    name, _, path = value.partition(":")
    return _load(name, path or None)


@cli.command("experiment")
@click.option("--dataset", required=True, help="Dataset name (ml-100k, ml-1m, ..., twitch, csv, parquet, synthetic).")
@click.option("--path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Dataset folder or file (not for synthetic).")
@click.option("--dataset-option", "dataset_options", multiple=True, metavar="KEY=VALUE",
              help="Loader option, repeatable: the column mapping of csv/parquet (user=COL item=COL timestamp=COL, "
                   "delimiter=; for csv), size=medium for synthetic.")
@click.option("--models", default=DEFAULT_MODELS, show_default=True,
              help="Comma-separated rows: felrec-q, felrec-p, felrec-{q,p}-{reset,zero,nn,ln,nomlp,sharemlp,notype,"
                   "paper,init,noprior} (init: the learning control, never trained; noprior: the trained model "
                   "without the popularity prior), sasrec, gru4rec, gru4rec-bptt, bpr-mf, jodie, popularity, "
                   "popularity-recent, cooccurrence (item-kNN, settings chosen on validation); or 'all'.")
@click.option("--zero-shot-from", default=None, metavar="DATASET:PATH",
              help="Dataset the -zero rows are trained on (e.g. ml-1m:/data/ml-1m, or synthetic).")
@click.option("--size", type=click.Choice(["small", "paper", "tiny"]), default="small", show_default=True,
              help="small: CPU-sized models and few epochs; paper: the paper's hyper-parameters; tiny: smoke runs.")
@click.option("--felrec-preset", type=click.Choice(["paper", "serve"]), default="paper", show_default=True,
              help="FELRec rows' recipe. paper: MLP heads, queue 8192, T 0.07 (scaled by --size); serve: the "
                   "recipe chosen on validation for serving (config presets 'serve'/'small': post-event cache, "
                   "calibrated popularity prior, ...). Ablation rows apply on top. Non-paper FELRec results are "
                   "keyed <row>@<preset>, so both presets can share one --out folder and its baseline rows.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default runs/experiment-<dataset or csv/parquet file name>-<size>, shared by "
                   "both FELRec presets). Finished rows are not recomputed.")
@click.option("--seed", type=int, default=0, show_default=True)
def experiment(dataset: str, path: Path | None, dataset_options: tuple[str, ...], models: str,
               zero_shot_from: str | None, size: str, felrec_preset: str, out_dir: Path | None, seed: int) -> None:
    """Train and evaluate every model on DATASET; write table.md/json, figure2.png and per-event Parquet."""
    from training.experiment import ExperimentConfig, run_experiment

    label, events = _load(dataset, str(path) if path else None, parse_key_values(dataset_options))
    zero = _zero_shot(zero_shot_from)
    cfg = ExperimentConfig(dataset=label, models=tuple(m for m in models.split(",") if m.strip()), size=size,
                           seed=seed, zero_shot_dataset=zero[0] if zero else None, felrec_preset=felrec_preset)
    # named after the file for csv/parquet: two files never share (and reuse) each other's finished rows
    out = out_dir or Path("runs") / f"experiment-{label}-{size}"
    result = run_experiment(events, cfg, out, zero_shot_events=zero[1] if zero else None)
    click.echo(result.table_md.read_text())
    click.echo(f"table: {result.table_md}  json: {result.table_json}  figure: {result.figure}  "
               f"computed now: {', '.join(result.computed) or 'nothing (all rows were finished)'}")
