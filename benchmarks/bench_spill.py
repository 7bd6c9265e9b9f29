"""Bounded memory (cache.max_entities): peak memory and events/s with and without a cap, same events.

Run: OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_spill.py [--events 300000 --users 150000
--items 40000 --cap 15000 --batch-size 1024 --threads 2 --encoder mean|felrec]

Each configuration runs in its own fresh process (so peak RSS belongs to that configuration alone)
over the very same seeded synthetic stream, with the paper's vector and history sizes (d=128,
L=64). The encoder is the same with and without a cap, so by default (`--encoder mean`) it is a
stand-in that makes the store the whole cost: a masked mean of the gathered history vectors, then a
fixed rotation, so every store read and write is exactly the one FELRec makes (same histories, same
gathered vectors, same commits) but the encoder's time and activation memory (which would hide the
store at the sizes one can replay here) are gone. `--encoder felrec` uses a one-layer FELRec
encoder (d=128, 4 heads, d_ff=256, random weights) instead; bench_worker.py measures that cost.
Configurations:

- `memory`: `RepresentationStore` (TensorVectors / `TensorRows` with a cap) and the engine's
  `infer_batch`, as training and evaluation use it;
- `worker`: `StreamWorker` on an `InMemorySource` with the sharded FAISS store (`make_store`, flat,
  2 shards) and a durable snapshot every `--snapshot-every` events, as `felrec-stream consume` runs it
  (its spill files go to <snapshot dir>/spill and are listed by the snapshots).

First, the footprint of one kind's table (FAISS flat backend) with `--footprint-entities` ids
like "user-00000001": bytes per entity when all are resident and when all are evicted (the floor
that stays in memory: id map, id string, per-slot columns), from tracemalloc (Python and numpy)
plus `ShardedFaissVectors.memory_bytes()` (FAISS), capacity slack of growing arrays included.

Then, per configuration: events/s over the whole replay, peak RSS of the process, its growth
over the RSS measured just before the first event (the store and what the replay allocates),
resident entities at the end, bytes of spill files, evictions and restores. Both runs end in the
same state (tests/felrec_stream/state/test_spill.py checks that bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENCODERS = {"mean": "mean-pool stand-in", "felrec": "FELRec, 1 layer"}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

def _mean_pool_encode(self, item_seq, item_mask, user_seq, user_mask):
    """(u, x): masked means of the users' item vectors / the items' user vectors, rotated by a fixed matrix."""
    import torch

    def pool(seq, mask):
        weights = mask.unsqueeze(-1).to(seq.dtype)
        return (seq * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    if not hasattr(self, "_bench_rotation"):
        generator = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(item_seq.shape[-1], item_seq.shape[-1], generator=generator))
        self._bench_rotation = q
    return pool(item_seq, item_mask) @ self._bench_rotation, pool(user_seq, user_mask) @ self._bench_rotation


def child(args: argparse.Namespace) -> dict:
    """One configuration, in this process; returns its figures."""

    import torch

    from felrec_stream.config import CacheConfig, Configs, EncoderConfig, ModelConfig
    from felrec_stream.data.synthetic import SyntheticConfig, generate
    from felrec_stream.log import configure_logging
    from felrec_stream.model.felrec import FELRec
    from felrec_stream.state.checkpoint import Checkpoint, save_checkpoint
    from felrec_stream.state.engine import infer_batch
    from felrec_stream.state.faiss_store import make_store
    from felrec_stream.state.snapshot import SnapshotManager
    from felrec_stream.state.store import RepresentationStore
    from felrec_stream.stream.events import iter_batches
    from felrec_stream.stream.source import InMemorySource
    from felrec_stream.config import WorkerConfig
    from pipelines.model import load_model, spill_dir_for
    from pipelines.worker import StreamWorker

    configure_logging(level="WARNING")
    torch.set_num_threads(args.threads)
    if args.encoder == "mean":
        FELRec.encode = _mean_pool_encode  # the stand-in (see the module docstring)
    events = generate(SyntheticConfig(n_users=args.users, n_items=args.items, n_events=args.events, seed=0)).events
    encoder = EncoderConfig(d_model=128, n_layers=1, n_heads=4, d_ff=256, dropout=0.0)
    cache = CacheConfig(history_len=64, shards=2, max_entities=args.cap)
    work = Path(tempfile.mkdtemp(prefix="bench-spill-"))
    torch.manual_seed(0)
    model = FELRec(encoder, ModelConfig())
    checkpoint = save_checkpoint(Checkpoint(model.state_dict(), Configs(encoder=encoder, model=ModelConfig(),
                                                                        cache=cache), epoch=0), work / "model.pt")
    bundle = load_model(checkpoint)
    baseline = _rss_mb()
    started = time.perf_counter()
    if args.path == "memory":
        store = RepresentationStore(bundle.dim, cache.history_len, max_entities=args.cap)
        for batch in iter_batches(events, args.batch_size):
            infer_batch(bundle.model, store, batch, bundle.cache)
        spill_dir = store.spill.directory if store.spill is not None else None
    else:
        snapshots = SnapshotManager(work / "snap", keep=2)
        store = make_store(bundle.dim, bundle.cache, spill_dir=spill_dir_for(work / "snap"))
        options = WorkerConfig("bench", batch_size=args.batch_size, until_end=True,
                                snapshot_every_events=args.snapshot_every)
        StreamWorker(bundle, store, InMemorySource(events, args.batch_size), options, snapshots).run()
        spill_dir = work / "snap" / "spill"
    seconds = time.perf_counter() - started
    spill_bytes = sum(p.stat().st_size for p in spill_dir.iterdir()) if spill_dir and spill_dir.is_dir() else 0
    tables = store.tables.values()
    return {"path": args.path, "cap": args.cap, "events_per_s": args.events / seconds,
            "peak_rss_mb": _peak_rss_mb(), "growth_mb": _peak_rss_mb() - baseline,
            "entities": sum(len(t) for t in tables), "resident": sum(getattr(t, "resident", len(t)) for t in tables),
            "spill_mb": spill_bytes / 2**20, "evicted": sum(getattr(t, "evicted", 0) for t in tables),
            "restored": sum(getattr(t, "restored", 0) for t in tables)}

def footprint(n: int, cap: int = 2_000) -> tuple[float, float]:
    """(bytes per resident entity, bytes per evicted entity) of one FAISS-backed kind, d=128, L=64.

    Resident: `n` ids registered in a table with a cap above n. Evicted: the same ids arriving in
    chunks into a table capped at `cap`, so its pools stay at the cap and only the floor grows.
    """
    import tracemalloc

    import numpy as np

    from felrec_stream.config import CacheConfig
    from felrec_stream.state.faiss_store import make_store

    def measure(max_entities: int, chunk: int) -> float:
        tracemalloc.start()
        store = make_store(128, CacheConfig(history_len=64, max_entities=max_entities))
        before = tracemalloc.get_traced_memory()[0] + store.users.vectors.inner.memory_bytes()
        for lo in range(0, n, chunk):
            store.users.slots(np.asarray([f"user-{i:08d}" for i in range(lo, min(lo + chunk, n))], dtype=object))
            store.users.enforce_cap()
        used = tracemalloc.get_traced_memory()[0] + store.users.vectors.inner.memory_bytes() - before
        tracemalloc.stop()
        return used / n

    return measure(2 * n, n), measure(cap, cap // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--users", type=int, default=150_000)
    parser.add_argument("--items", type=int, default=40_000)
    parser.add_argument("--cap", type=int, default=15_000, help="max_entities (per kind) of the capped runs")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--snapshot-every", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paths", default="memory,worker")
    parser.add_argument("--encoder", choices=["mean", "felrec"], default="mean")
    parser.add_argument("--footprint-entities", type=int, default=200_000)
    parser.add_argument("--child", choices=["memory", "worker"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.path = args.child
        print(json.dumps(child(args)))
        return
    if args.footprint_entities:
        from felrec_stream.log import configure_logging

        configure_logging(level="WARNING")
        resident, evicted = footprint(args.footprint_entities)
        print(f"footprint of {args.footprint_entities:,} users (d=128, L=64, FAISS flat): {resident:,.0f} B per "
              f"resident entity, {evicted:,.0f} B per evicted one ({evicted / resident:.0%})")
    rows = []
    for path in args.paths.split(","):
        for cap in (0, args.cap):
            command = [sys.executable, __file__, "--child", path, "--events", str(args.events), "--users",
                       str(args.users), "--items", str(args.items), "--cap", str(cap), "--batch-size",
                       str(args.batch_size), "--snapshot-every", str(args.snapshot_every),
                       "--threads", str(args.threads), "--encoder", args.encoder]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if done.returncode:
                sys.exit(f"{path} cap={cap} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  done: {path} cap={cap}", file=sys.stderr)
    print(f"{args.events:,} events, {args.users:,} users, {args.items:,} items (synthetic, seed 0), batch "
          f"{args.batch_size}, d=128, L=64, encoder {ENCODERS[args.encoder]}, {args.threads} threads")
    print("| path | max_entities | events/s | peak RSS MB | growth MB | entities | resident | spill MB "
          "| evicted | restored |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['path']} | {r['cap'] or 'none'} | {r['events_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} | "
              f"{r['growth_mb']:,.0f} | {r['entities']:,} | {r['resident']:,} | {r['spill_mb']:,.1f} | "
              f"{r['evicted']:,} | {r['restored']:,} |")

if __name__ == "__main__":
    main()
