"""`serve`: the standalone query API over worker snapshots; `export`: parquet + FAISS files for offline jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from felrec_stream.cli.group import cli
from felrec_stream.config import CacheConfig, literal_choices

_INDEX_TYPES = click.Choice(literal_choices(CacheConfig, "index_type"))


def _overrides(index_type: str | None, shards: int | None) -> dict[str, Any]:
    return {k: v for k, v in (("index_type", index_type), ("shards", shards)) if v is not None}


@cli.command("serve")
@click.option("--snapshot-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Snapshot root written by `consume` (may be empty at start: /readyz says 503 until one appears).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; use 0.0.0.0 only behind a network you trust (no auth).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--poll-seconds", default=2.0, show_default=True, type=click.FloatRange(min=0.05),
              help="How often to look for a newer snapshot.")
@click.option("--index-type", type=_INDEX_TYPES, default=None,
              help="Index the served vectors differently from the worker (default: the snapshot's cache config).")
@click.option("--shards", type=click.IntRange(min=1), default=None, help="Override the snapshot's shard count.")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Online learning's versions (consume --models-dir): the version a snapshot names encodes "
                   "unknown users (cold start); without it they are 404.")
def serve(snapshot_dir: Path, host: str, port: int, poll_seconds: float, index_type: str | None,
          shards: int | None, models_dir: Path | None) -> None:
    """Serve top-k recommendations and similarities from the newest snapshot, following new ones."""
    from felrec_stream.serving.app import create_app, run_server
    from felrec_stream.serving.snapshots import SnapshotFollower
    from felrec_stream.state.versions import VersionStore

    follower = SnapshotFollower(snapshot_dir, poll_seconds, _overrides(index_type, shards),
                                models=VersionStore(models_dir) if models_dir else None)
    follower.poll_once()  # ready at once when a snapshot exists
    follower.start()
    try:
        run_server(create_app(follower.current), host, port)
    finally:
        follower.stop()


@cli.command("export")
@click.option("--snapshot-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Snapshot root written by `consume`; the newest valid snapshot is exported.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (users.parquet, items.parquet, faiss/, layout.json).")
@click.option("--index-type", type=_INDEX_TYPES, default=None, help="ANN side index to write with the flat shards.")
@click.option("--shards", type=click.IntRange(min=1), default=None, help="Shard count of the written FAISS files.")
def export(snapshot_dir: Path, out_dir: Path, index_type: str | None, shards: int | None) -> None:
    """Write the store as parquet + FAISS index files that offline jobs read without felrec-stream."""
    from felrec_stream.serving.export import export_snapshot

    layout = export_snapshot(snapshot_dir, out_dir, _overrides(index_type, shards))
    summary = {"out": str(out_dir), **{name: t["rows"] for name, t in layout["tables"].items()},
               "source": layout["source"]}
    click.echo(json.dumps(summary))
