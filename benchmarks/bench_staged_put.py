"""The worker's vector write at 1M items with IVF: how much of it `stage` moves out of the query lock.

Times, per batch of `--batch` item writes into one IVF shard (`--nlist` lists, 1 thread): `stage`
(unit vectors, norms, the list assignment: no lock needed), `put_staged` (what the worker does under
the lock) and a plain `put` (assignment inside), on a Gaussian mixture like bench_query.py's.

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python benchmarks/bench_staged_put.py
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch

from felrec_stream.state.faiss_store import ShardedFaissVectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32)

    def mixture(n: int) -> np.ndarray:
        return centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, args.dim), dtype=np.float32)

    store = ShardedFaissVectors(args.dim, 1, "ivf", ivf_nlist=args.nlist, ivf_nprobe=2)
    store.ensure(args.items, np.asarray([f"i{n}" for n in range(args.items)], dtype=object))
    for lo in range(0, args.items, 100_000):
        hi = min(lo + 100_000, args.items)
        store.put(torch.arange(lo, hi), torch.from_numpy(mixture(hi - lo)))
    seconds = {"stage": 0.0, "put_staged": 0.0, "put": 0.0}
    for _ in range(args.batches):
        slots = torch.from_numpy(rng.choice(args.items, args.batch, replace=False))
        t0 = time.perf_counter()
        staged = store.stage(slots, torch.from_numpy(mixture(args.batch)))
        t1 = time.perf_counter()
        store.put_staged(staged)
        t2 = time.perf_counter()
        store.put(torch.from_numpy(rng.choice(args.items, args.batch, replace=False)),
                  torch.from_numpy(mixture(args.batch)))
        seconds["stage"] += t1 - t0
        seconds["put_staged"] += t2 - t1
        seconds["put"] += time.perf_counter() - t2
    ms = {k: 1000 * v / args.batches for k, v in seconds.items()}
    print(f"{args.items:,} items, nlist {args.nlist}, {args.batches} batches of {args.batch}: "
          f"stage {ms['stage']:.2f} ms (no lock), put_staged {ms['put_staged']:.2f} ms (under the lock), "
          f"plain put {ms['put']:.2f} ms: the lock is held {ms['put_staged'] / ms['put']:.0%} of a plain put")


if __name__ == "__main__":
    main()
