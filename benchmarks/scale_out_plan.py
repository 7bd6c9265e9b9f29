"""The scale-out plan in numbers: the cache sharded by id hash across ranks (docs/scale-out.md).

Run: python benchmarks/scale_out_plan.py [--ranks 1,8,16,64 --batch-size 1024 --dim 128
--history 64 --unique 0.5 --link-gbps 100 --dataset synthetic|ml-100k --path ...]

A model, not a measurement of a distributed run (none exists yet). Per global step of B events,
split evenly over R data-parallel ranks (b = B/R events each), with every user/item owned by rank
hash(id) % R (as `faiss_store.shard_of` already assigns FAISS shards), one step moves, per rank:

1. events to the owners of their user and item: 2b records (entity key, other key, batch position,
   time: 4 x int64); the owners apply the in-batch history rule (`HistoryBuffer.plan`) and later
   the history append (`HistoryBuffer.apply`) from these records, so appends cost nothing more;
2. each event's history back from the owner: 2b rows of L int64 keys + a length;
3. the cached vectors of the history entries: the unique keys among 2bL entries (fraction u)
   to their owners, then u*2bL vectors of d values back (float32 or bfloat16);
4. the new vectors of the batch's users and items to their owners: 2b x (d values + key + position).

Each message is an `all_to_all_single` with per-rank split sizes; with hashing, a fraction
(R-1)/R of every message leaves the rank. Memory per rank: N/R entities x (vector, history,
length/count/time/popularity, a compact id index). `--dataset` measures the history fill and u of a real
or synthetic stream with the store's own `HistoryBuffer` (the figures below assume steady state:
full histories, u as given).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

ENTITIES = (10_000_000, 100_000_000, 1_000_000_000)  # users + items
DTYPES = {"float32": 4, "bfloat16": 2}
KEY = 8  # int64 entity key (a 64-bit id hash: slots are rank-local once the cache is sharded)
ID_INDEX = 32  # bytes per entity of an open-addressing key -> row table (16 B entries at load factor 0.5)
COUNTERS = 5 * 8  # history length, interaction count, last-update time, popularity and its event index


@dataclass(frozen=True)
class Shape:
    batch: int
    dim: int
    history: int
    unique: float  # unique history entities / history entries in a rank's step
    fill: float  # mean history length / L


def bytes_per_entity(shape: Shape, value_bytes: int) -> dict[str, float]:
    return {"vector": shape.dim * value_bytes, "history": shape.history * KEY, "counters": COUNTERS,
            "id index": ID_INDEX}


def step_bytes_per_rank(shape: Shape, ranks: int, value_bytes: int) -> dict[str, float]:
    """Bytes one rank sends per step (it receives as much on average: hashing balances owners)."""
    b = shape.batch / ranks
    off = (ranks - 1) / ranks
    entries = 2 * b * shape.history * shape.fill
    return {
        "events to owners": off * 2 * b * 4 * KEY,
        "histories back": off * (entries * KEY + 2 * b * KEY),
        "vector keys": off * shape.unique * entries * KEY,
        "vectors back": off * shape.unique * entries * shape.dim * value_bytes,
        "new vectors": off * 2 * b * (shape.dim * value_bytes + 2 * KEY),
    }


def measure(events, batch: int, history: int) -> tuple[float, float]:
    """(mean history fill, unique fraction) of the history entries a `batch`-event step reads."""
    from felrec_stream.state.store import HistoryBuffer, IdMap

    ids = {kind: IdMap() for kind in ("user", "item")}
    buffers = {kind: HistoryBuffer(history) for kind in ("user", "item")}
    users = events.column("user").to_numpy(zero_copy_only=False)
    items = events.column("item").to_numpy(zero_copy_only=False)
    fills, uniques = [], []
    for lo in range(0, len(users) - batch + 1, batch):
        u = ids["user"].lookup(users[lo:lo + batch], create=True)
        i = ids["item"].lookup(items[lo:lo + batch], create=True)
        buffers["user"].ensure(len(ids["user"]))
        buffers["item"].ensure(len(ids["item"]))
        plans = {"user": buffers["user"].plan(u, i), "item": buffers["item"].plan(i, u)}
        entries = 0
        keys = []
        for kind, plan in plans.items():
            valid = plan.event_history[plan.event_history >= 0]
            entries += len(valid)
            keys.append(np.unique(valid) + (0 if kind == "user" else 1 << 40))  # items' entries are users
        fills.append(entries / (2 * batch * history))
        uniques.append(len(np.concatenate(keys)) / max(entries, 1))
        for kind, plan in plans.items():
            buffers[kind].apply(plan)
    half = len(fills) // 2  # the second half: histories have filled up
    return float(np.mean(fills[half:])), float(np.mean(uniques[half:]))


def _mb(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def _gb(x: float) -> str:
    return f"{x / 2**30:,.1f}"


def print_tables(shape: Shape, ranks: list[int], link_gbps: float) -> None:
    print(f"B={shape.batch} events/step, d={shape.dim}, L={shape.history}, history fill {shape.fill:.2f}, "
          f"unique fraction u={shape.unique:.2f}, link {link_gbps:g} Gbit/s per rank\n")
    print("Memory per rank (GiB): cache only, every entity resident; (spill) = what a per-rank "
          "cache.max_entities keeps on disk instead when 10% of the entities are resident.\n")
    print("| entities | vectors | GiB/entity-set | " + " | ".join(f"R={r}" for r in ranks) + " |")
    print("| ---: | --- | ---: | " + " | ".join("---:" for _ in ranks) + " |")
    for n in ENTITIES:
        for dtype, size in DTYPES.items():
            per = bytes_per_entity(shape, size)
            full = sum(per.values())
            floor = per["counters"] + per["id index"] + 16  # + residency and spill location
            cells = []
            for r in ranks:
                resident = n / r * (0.1 * full + 0.9 * floor)
                cells.append(f"{_gb(n / r * full)} ({_gb(resident)})")
            print(f"| {n:,} | {dtype} | {_gb(n * full)} | " + " | ".join(cells) + " |")
    print("\nBytes per entity:", ", ".join(f"{k} {v:g}" for k, v in bytes_per_entity(shape, 4).items()),
          "(float32); the FAISS query index adds 4*d + 12 B per indexed entity (float32 unit vector, norm, maps)")
    print("\nPer step and rank (MiB sent; as much received), and the step's lower bound from the link:\n")
    print("| vectors | R | events | histories | vector keys | vectors back | new vectors | total MiB | ms at link |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dtype, size in DTYPES.items():
        for r in ranks:
            parts = step_bytes_per_rank(shape, r, size)
            total = sum(parts.values())
            ms = total * 8 / (link_gbps * 1e9) * 1000
            print(f"| {dtype} | {r} | " + " | ".join(_mb(v) for v in parts.values()) + f" | {_mb(total)} | {ms:.2f} |")
    print("\nThe step traffic does not depend on the number of entities: it is set by B, L, d and u.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,8,16,64")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--history", type=int, default=64)
    parser.add_argument("--unique", type=float, default=0.5, help="assumed unique fraction of history entries")
    parser.add_argument("--fill", type=float, default=1.0, help="assumed mean history length / L (steady state: 1)")
    parser.add_argument("--link-gbps", type=float, default=100.0)
    parser.add_argument("--dataset", default=None, help="measure fill and u on this dataset (e.g. synthetic, ml-100k)")
    parser.add_argument("--path", default=None)
    parser.add_argument("--dataset-option", action="append", default=[], help="key=value, e.g. size=large")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.dataset:
        from connectors.datasets import load_dataset

        options = dict(option.split("=", 1) for option in args.dataset_option)
        events = load_dataset(args.dataset, args.path, **options)
        print(f"measured on {args.dataset} ({len(events):,} events), second half of the stream:")
        for r in ranks:
            b = max(args.batch_size // r, 1)
            fill, unique = measure(events, b, args.history)
            print(f"  b={b:>5} events per rank-step: history fill {fill:.3f}, unique fraction {unique:.3f}")
        print()
    print_tables(Shape(args.batch_size, args.dim, args.history, args.unique, args.fill), ranks, args.link_gbps)


if __name__ == "__main__":
    main()
